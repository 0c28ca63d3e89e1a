//! The config file against a small stand-in for `kiln serve`'s flags, one
//! of each kind; the real flags are covered by `tests/serve_config.rs`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use super::*;
use crate::server::SocketMode;

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    Serve(Serve),
    Other {
        #[arg(long)]
        flag: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Vmm {
    Auto,
    Qemu,
}

#[derive(clap::Args, Debug)]
struct Serve {
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    #[arg(long, default_value_t = 2)]
    max_vms: usize,
    #[arg(long, default_value = "0600")]
    unix_socket_mode: SocketMode,
    #[arg(long, value_enum, default_value = "auto")]
    vmm: Vmm,
    #[arg(long)]
    no_network: bool,
    #[arg(long = "allow-ro-path")]
    allow_ro_paths: Vec<PathBuf>,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, default_value_t = 0.5)]
    ratio: f64,
    #[command(flatten)]
    config: ConfigArgs,
}

/// A config file with `text` in a temporary directory.
fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn run(args: &[&str]) -> Result<Serve, ArgsError> {
    let argv = std::iter::once("kiln").chain(args.iter().copied());
    match parse::<Cli>(argv)? {
        Parsed::Run(Cli {
            command: Cmd::Serve(serve),
        }) => Ok(serve),
        other => panic!("not a serve: {other:?}"),
    }
}

fn serve_with(text: &str, args: &[&str]) -> Result<Serve, ArgsError> {
    let (_dir, path) = config(text);
    let path = path.to_str().unwrap().to_owned();
    let mut all = vec!["serve", "--config", &path];
    all.extend_from_slice(args);
    run(&all)
}

/// The config error of `text`, as printed.
fn error_of(text: &str) -> String {
    match serve_with(text, &[]) {
        Err(ArgsError::Config(e)) => e.to_string(),
        Err(ArgsError::Usage(e)) => panic!("a usage error, not a config error: {e}"),
        Ok(serve) => panic!("accepted: {serve:?}"),
    }
}

#[test]
fn keys_fill_the_flags_the_command_line_left_out() {
    let serve = serve_with(
        "listen = \"0.0.0.0:9000\"\nmax-vms = 4\nunix-socket-mode = \"0660\"\n\
         vmm = \"qemu\"\nno-network = true\nallow-ro-path = [\"/dev/kvm\", \"/srv\"]\n\
         tls-cert = \"/etc/kiln/cert.pem\"\ntls-key = \"/etc/kiln/key.pem\"\nratio = 2\n",
        &[],
    )
    .unwrap();
    assert_eq!(serve.listen, "0.0.0.0:9000");
    assert_eq!(serve.max_vms, 4);
    assert_eq!(serve.unix_socket_mode, SocketMode(0o660));
    assert_eq!(serve.vmm, Vmm::Qemu);
    assert!(serve.no_network);
    assert_eq!(
        serve.allow_ro_paths,
        [PathBuf::from("/dev/kvm"), PathBuf::from("/srv")]
    );
    assert_eq!(serve.tls_cert, Some(PathBuf::from("/etc/kiln/cert.pem")));
    assert_eq!(serve.ratio, 2.0);
}

#[test]
fn the_command_line_overrides_the_file_and_replaces_its_lists() {
    let serve = serve_with(
        "max-vms = 4\nallow-ro-path = [\"/dev/kvm\", \"/srv\"]\nlisten = \"0.0.0.0:9000\"\n",
        &["--max-vms", "8", "--allow-ro-path", "/opt"],
    )
    .unwrap();
    assert_eq!(serve.max_vms, 8);
    assert_eq!(serve.allow_ro_paths, [PathBuf::from("/opt")]);
    assert_eq!(serve.listen, "0.0.0.0:9000", "keys not overridden stay");
}

#[test]
fn false_and_empty_leave_the_defaults() {
    let serve = serve_with("no-network = false\nallow-ro-path = []\n", &[]).unwrap();
    assert!(!serve.no_network);
    assert!(serve.allow_ro_paths.is_empty());
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_the_key_meant() {
    let e = error_of("listen = \"127.0.0.1:1\"\n\n# comment\nmax-vm = 4\n");
    assert!(
        e.ends_with("line 4: unknown key \"max-vm\" (did you mean \"max-vms\"?)"),
        "{e}"
    );
    assert!(e.starts_with("config /"), "{e}");
    let e = error_of("[vm]\naccel = \"tcg\"\n");
    assert!(
        e.ends_with(
            "line 1: unknown table [vm]: every key is a `kiln serve` flag at the top level"
        ),
        "{e}"
    );
}

#[test]
fn the_files_own_keys_are_not_keys() {
    let e = error_of("config = \"/etc/other.toml\"\n");
    assert!(e.ends_with("line 1: unknown key \"config\""), "{e}");
    let e = error_of("help = true\n");
    assert!(e.ends_with("line 1: unknown key \"help\""), "{e}");
}

#[test]
fn a_wrong_type_is_named_with_its_line_and_the_type_expected() {
    let cases = [
        ("max-vms = \"4\"\n", 1, "\"max-vms\" must be an integer"),
        ("\n\nmax-vms = 4.5\n", 3, "\"max-vms\" must be an integer"),
        ("listen = 8000\n", 1, "\"listen\" must be a string"),
        (
            "unix-socket-mode = 0o600\n",
            1,
            "\"unix-socket-mode\" must be a string",
        ),
        (
            "no-network = \"yes\"\n",
            1,
            "\"no-network\" must be a boolean (true or false)",
        ),
        (
            "allow-ro-path = \"/dev/kvm\"\n",
            1,
            "\"allow-ro-path\" must be an array of strings",
        ),
        (
            "allow-ro-path = [1]\n",
            1,
            "\"allow-ro-path\" must be an array of strings",
        ),
        ("ratio = \"x\"\n", 1, "\"ratio\" must be a number"),
    ];
    for (text, line, message) in cases {
        let e = error_of(text);
        assert!(
            e.ends_with(&format!("line {line}: {message}")),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn a_value_its_flag_refuses_is_named_with_its_line() {
    let e = error_of("max-vms = 1\n\nunix-socket-mode = \"0999\"\n");
    assert!(
        e.ends_with(
            "line 3: \"unix-socket-mode\": \"0999\" is not an octal permission mode (0000 to 0777)"
        ),
        "{e}"
    );
    let e = error_of("vmm = \"firecracker\"\n");
    assert!(
        e.ends_with("line 1: \"vmm\": \"firecracker\" is not one of auto, qemu"),
        "{e}"
    );
    let e = error_of("max-vms = -1\n");
    assert!(e.contains("line 1: \"max-vms\": "), "{e}");
}

#[test]
fn a_syntax_error_names_its_line() {
    let e = error_of("max-vms = 4\nlisten = \n");
    assert!(e.contains(" line 2: "), "{e}");
    let e = error_of("max-vms = 4\nmax-vms = 5\n");
    assert!(e.contains(" line 2: "), "{e}");
}

#[test]
fn a_missing_file_says_which() {
    let e = run(&["serve", "--config", "/nonexistent/kiln.toml"]).unwrap_err();
    let ArgsError::Config(ConfigError::Read { path, .. }) = e else {
        panic!("{e:?}")
    };
    assert_eq!(path, PathBuf::from("/nonexistent/kiln.toml"));
}

#[test]
fn other_subcommands_are_untouched() {
    let Parsed::Run(cli) = parse::<Cli>(["kiln", "other", "--flag"]).unwrap() else {
        panic!("check")
    };
    assert!(matches!(cli.command, Cmd::Other { flag: true }));
}

#[test]
fn check_config_prints_every_key_and_reads_back_the_same() {
    let (_dir, path) = config(
        "max-vms = 4\nvmm = \"qemu\"\nallow-ro-path = [\"/dev/kvm\"]\nunix-socket-mode = \"660\"\n",
    );
    let path = path.to_str().unwrap();
    let Parsed::Check(text) = parse::<Cli>([
        "kiln",
        "serve",
        "--config",
        path,
        "--check-config",
        "--no-network",
    ])
    .unwrap() else {
        panic!("no check")
    };
    let body: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        body,
        [
            "listen = \"127.0.0.1:8000\"",
            "max-vms = 4",
            "unix-socket-mode = \"660\"",
            "vmm = \"qemu\"",
            "no-network = true",
            "allow-ro-path = [\"/dev/kvm\"]",
            "# tls-cert: not set",
            "# tls-key: not set",
            "ratio = 0.5",
        ],
        "{text}"
    );
    let (_dir, again) = config(&text);
    let Parsed::Check(reread) = parse::<Cli>([
        "kiln",
        "serve",
        "--config",
        again.to_str().unwrap(),
        "--check-config",
    ])
    .unwrap() else {
        panic!("no check")
    };
    assert_eq!(reread, text);
}

#[test]
fn the_file_may_complete_a_flag_the_command_line_gave() {
    let serve = serve_with("tls-key = \"/k.pem\"\n", &["--tls-cert", "/c.pem"]).unwrap();
    assert_eq!(serve.tls_cert, Some(PathBuf::from("/c.pem")));
    assert_eq!(serve.tls_key, Some(PathBuf::from("/k.pem")));
    // Neither the command line nor the file completes it: clap's error.
    let e = serve_with("max-vms = 3\n", &["--tls-cert", "/c.pem"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::MissingRequiredArgument),
        "{e:?}"
    );
    // Without a file, the first error stands.
    let e = run(&["serve", "--tls-cert", "/c.pem"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::MissingRequiredArgument),
        "{e:?}"
    );
    let e = serve_with("max-vms = 3\n", &["--max-vms", "x"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::ValueValidation),
        "{e:?}"
    );
    let e = run(&["serve", "--max-vms", "x"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::ValueValidation),
        "{e:?}"
    );
}

#[test]
fn help_is_help_with_or_without_a_file() {
    let e = run(&["serve", "--help"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::DisplayHelp),
        "{e:?}"
    );
    let e = serve_with("max-vms = 3\n", &["--help"]).unwrap_err();
    assert!(
        matches!(&e, ArgsError::Usage(u) if u.kind() == clap::error::ErrorKind::DisplayHelp),
        "{e:?}"
    );
}
