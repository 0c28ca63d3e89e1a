//! `kiln serve --config FILE` through the real binary: every flag of
//! `kiln serve` round-trips through the file (the list of keys comes from
//! the binary's own `--check-config`, so a new flag is covered the day it
//! is added), errors name key and line, the command line and the
//! environment override the file, and `contrib/kiln.toml` is a complete,
//! truthful example.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A value for a key, different from its default.
#[derive(Debug, Clone)]
enum Sample {
    /// A switch, turned on.
    On,
    /// One value; `true` if a TOML string, else written bare.
    One(String, bool),
    /// A repeatable flag's values (strings).
    Many(Vec<String>),
}

impl Sample {
    fn toml(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.into()).to_string();
        match self {
            Sample::On => "true".into(),
            Sample::One(v, true) => quote(v),
            Sample::One(v, false) => v.clone(),
            Sample::Many(vs) => {
                let items: Vec<String> = vs.iter().map(|v| quote(v)).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }

    fn flags(&self, key: &str) -> Vec<String> {
        match self {
            Sample::On => vec![format!("--{key}")],
            Sample::One(v, _) => vec![format!("--{key}"), v.clone()],
            Sample::Many(vs) => vs
                .iter()
                .flat_map(|v| [format!("--{key}"), v.clone()])
                .collect(),
        }
    }
}

/// A line of `--check-config`: a value (as TOML), or not set.
type Effective = BTreeMap<String, Option<String>>;

/// `kiln serve ARGS` with no `KILN_*` variable of the caller's (the suite
/// may run with some), plus `env`.
fn kiln_serve(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.arg("serve").args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KILN_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().unwrap()
}

/// The effective settings of `kiln serve ARGS --check-config`.
fn check(args: &[&str], env: &[(&str, &str)]) -> Effective {
    let mut all = args.to_vec();
    all.push("--check-config");
    let out = kiln_serve(&all, env);
    assert!(
        out.status.success(),
        "kiln serve {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_effective(&String::from_utf8(out.stdout).unwrap())
}

fn parse_effective(text: &str) -> Effective {
    let mut settings = Effective::new();
    for line in text.lines().skip(1) {
        if let Some(key) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(": not set"))
        {
            settings.insert(key.into(), None);
        } else {
            let (key, value) = line.split_once(" = ").unwrap_or_else(|| panic!("{line:?}"));
            settings.insert(key.into(), Some(value.into()));
        }
    }
    settings
}

/// The error `kiln serve --config FILE` prints for a file holding `text`.
fn config_error(text: &str) -> (PathBuf, String) {
    let (dir, path) = config_file(text);
    let out = kiln_serve(&["--config", path.to_str().unwrap(), "--check-config"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    drop(dir);
    (path, String::from_utf8(out.stderr).unwrap())
}

fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// Values for the keys whose type alone does not give a valid one.
fn known_sample(key: &str) -> Option<Sample> {
    let one = |v: &str| Some(Sample::One(v.into(), true));
    match key {
        "listen" => one("0.0.0.0:9000"),
        "unix-socket-mode" | "nix-daemon-socket-mode" => one("0660"),
        "castore" | "path-info" => one("grpc+http://192.0.2.1:8000"),
        "vmm" => one("qemu"),
        "accel" => one("tcg"),
        "kernel" => one("debian-cloud"),
        "network-dns" => one("192.0.2.53"),
        "metrics-listen" => one("127.0.0.1:9464"),
        "lb-agent-listen" => one("127.0.0.1:9465"),
        "database" => one("postgres://kiln@192.0.2.9:5432/kiln"),
        "blob-store" => one("s3://kiln/blobs?endpoint=http://192.0.2.10:3900&region=garage"),
        "host-id" => one("h1"),
        "log-format" => one("json"),
        "network-allow" => Some(Sample::Many(vec!["10.1.0.0/16".into(), "192.0.2.7".into()])),
        "nix-system-feature" => Some(Sample::Many(vec![
            "big-parallel".into(),
            "benchmark".into(),
        ])),
        "tenant-from-cert" => one("san-dns:.tenants.example.org"),
        "nix-daemon-tenant" => one("nix-users"),
        "tenant-max-vms" | "tenant-max-queue" => Some(Sample::One("3".into(), false)),
        "tenant-memory-mib" => Some(Sample::One("8192".into(), false)),
        "tenant-limit" => Some(Sample::Many(vec![
            "team-a:max-vms=2,weight=3".into(),
            "team-b:memory-mib=4096".into(),
        ])),
        "allow-ro-path" => Some(Sample::Many(vec!["/dev/kvm".into(), "/srv/mirror".into()])),
        _ => None,
    }
}

/// A value for `key` other than its default, from the table above or from
/// its type: a switch turned on, an integer one more, a path for a path or
/// for a string that has no default.
fn sample(key: &str, default: &Option<String>) -> Sample {
    if let Some(sample) = known_sample(key) {
        return sample;
    }
    match default.as_deref() {
        Some("false") => Sample::On,
        Some(n) if n.parse::<i64>().is_ok() => {
            Sample::One((n.parse::<i64>().unwrap() + 1).to_string(), false)
        }
        None => Sample::One(format!("/etc/kiln/{key}"), true),
        // A path with a default: another path.
        Some(path) if path.starts_with("\"/") => Sample::One(format!("/srv/kiln/{key}"), true),
        Some(other) => panic!(
            "no sample value for the new key {key:?} (default {other}): add one to known_sample"
        ),
    }
}

#[test]
fn every_flag_round_trips_through_the_file() {
    let defaults = check(&[], &[]);
    assert!(defaults.len() > 40, "{defaults:?}");
    let samples: Vec<(String, Sample)> = defaults
        .iter()
        .map(|(key, default)| (key.clone(), sample(key, default)))
        .collect();
    let file: String = samples
        .iter()
        .map(|(key, sample)| format!("{key} = {}\n", sample.toml()))
        .collect();
    let (_dir, path) = config_file(&file);
    let from_file = check(&["--config", path.to_str().unwrap()], &[]);
    let flags: Vec<String> = samples
        .iter()
        .flat_map(|(key, sample)| sample.flags(key))
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let from_flags = check(&flags, &[]);
    assert_eq!(from_file, from_flags, "the file:\n{file}");
    for (key, sample) in &samples {
        assert_eq!(
            from_file[key].as_deref(),
            Some(sample.toml().as_str()),
            "{key} from the file"
        );
        assert_ne!(from_file[key], defaults[key], "{key} took no effect");
    }
    // And the printed settings, read back as a file, mean the same.
    let printed: String = from_file
        .iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key} = {v}\n")))
        .collect();
    let (_dir, again) = config_file(&printed);
    assert_eq!(
        check(&["--config", again.to_str().unwrap()], &[]),
        from_file
    );
}

#[test]
fn an_unknown_key_names_itself_and_its_line() {
    let (path, stderr) = config_error("listen = \"127.0.0.1:8000\"\n\n# comment\nmax-vm = 4\n");
    assert_eq!(
        stderr,
        format!(
            "kiln: config {} line 4: unknown key \"max-vm\" (did you mean \"max-vms\"?)\n",
            path.display()
        )
    );
}

#[test]
fn a_wrong_type_names_the_key_its_line_and_the_type() {
    let (path, stderr) = config_error("listen = \"127.0.0.1:8000\"\n\nmax-vms = \"4\"\n");
    assert_eq!(
        stderr,
        format!(
            "kiln: config {} line 3: \"max-vms\" must be an integer\n",
            path.display()
        )
    );
    let (_, stderr) = config_error("no-network = 1\n");
    assert!(
        stderr.ends_with("line 1: \"no-network\" must be a boolean (true or false)\n"),
        "{stderr}"
    );
    let (_, stderr) = config_error("allow-ro-path = \"/dev/kvm\"\n");
    assert!(
        stderr.ends_with("line 1: \"allow-ro-path\" must be an array of strings\n"),
        "{stderr}"
    );
}

#[test]
fn a_value_its_flag_refuses_names_the_key_and_its_line() {
    let (path, stderr) = config_error("max-vms = 2\nunix-socket-mode = \"0999\"\n");
    assert_eq!(
        stderr,
        format!(
            "kiln: config {} line 2: \"unix-socket-mode\": \"0999\" is not an octal permission mode (0000 to 0777)\n",
            path.display()
        )
    );
    let (_, stderr) = config_error("\nvmm = \"firecracker\"\n");
    assert!(
        stderr.ends_with(
            "line 2: \"vmm\": \"firecracker\" is not one of auto, cloud-hypervisor, qemu\n"
        ),
        "{stderr}"
    );
    let (_, stderr) = config_error("network-allow = [\"10.0.0.0/33\"]\n");
    assert!(stderr.contains("line 1: \"network-allow\": "), "{stderr}");
}

#[test]
fn a_missing_config_file_is_an_error_naming_it() {
    let out = kiln_serve(
        &["--config", "/nonexistent/kiln.toml", "--check-config"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("kiln: reading the config file /nonexistent/kiln.toml: "),
        "{stderr}"
    );
}

#[test]
fn the_command_line_overrides_the_file() {
    let (_dir, path) = config_file(
        "max-vms = 4\nallow-ro-path = [\"/dev/kvm\", \"/srv\"]\nvcpus = 2\nno-network = true\n",
    );
    let path = path.to_str().unwrap();
    let got = check(
        &[
            "--config",
            path,
            "--max-vms",
            "6",
            "--allow-ro-path",
            "/opt",
        ],
        &[],
    );
    assert_eq!(got["max-vms"].as_deref(), Some("6"));
    assert_eq!(
        got["allow-ro-path"].as_deref(),
        Some("[\"/opt\"]"),
        "replaced, not merged"
    );
    assert_eq!(
        got["vcpus"].as_deref(),
        Some("2"),
        "the file's other keys stay"
    );
    assert_eq!(got["no-network"].as_deref(), Some("true"));
}

#[test]
fn environment_variables_set_their_flags_between_command_line_and_file() {
    let vars = [
        (
            "KILN_LISTEN",
            "listen",
            "/run/kiln/kiln.sock",
            "\"/run/kiln/kiln.sock\"",
        ),
        ("KILN_DATA_DIR", "data-dir", "/srv/kiln", "\"/srv/kiln\""),
        (
            "KILN_CACHE_DIR",
            "cache-dir",
            "/srv/kiln-cache",
            "\"/srv/kiln-cache\"",
        ),
        ("KILN_MAX_VMS", "max-vms", "5", "5"),
        (
            "KILN_MEMORY_BUDGET_MIB",
            "memory-budget-mib",
            "4096",
            "4096",
        ),
        ("KILN_WARM_VMS", "warm-vms", "0", "0"),
        (
            "KILN_AUTH_TOKENS",
            "auth-tokens",
            "/etc/kiln/tokens",
            "\"/etc/kiln/tokens\"",
        ),
        ("KILN_KERNEL", "kernel", "debian-cloud", "\"debian-cloud\""),
    ];
    for (var, key, value, shown) in vars {
        let got = check(&[], &[(var, value)]);
        assert_eq!(got[key].as_deref(), Some(shown), "{var}");
    }
    // Above the file, below the command line.
    let (_dir, path) = config_file("max-vms = 4\nvcpus = 3\n");
    let path = path.to_str().unwrap();
    let got = check(&["--config", path], &[("KILN_MAX_VMS", "5")]);
    assert_eq!(got["max-vms"].as_deref(), Some("5"));
    assert_eq!(got["vcpus"].as_deref(), Some("3"));
    let got = check(
        &["--config", path, "--max-vms", "6"],
        &[("KILN_MAX_VMS", "5")],
    );
    assert_eq!(got["max-vms"].as_deref(), Some("6"));
    // KILN_CONFIG names the file.
    let got = check(&[], &[("KILN_CONFIG", path)]);
    assert_eq!(got["vcpus"].as_deref(), Some("3"));
}

/// `contrib/kiln.toml`.
fn example() -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/kiln.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn the_example_config_is_accepted_and_changes_nothing() {
    let (path, _) = example();
    let defaults = check(&[], &[]);
    assert_eq!(check(&["--config", path.to_str().unwrap()], &[]), defaults);
}

#[test]
fn the_example_config_shows_every_key_with_its_default() {
    let (_, text) = example();
    let defaults = check(&[], &[]);
    for (key, default) in &defaults {
        let shown: Vec<&str> = text
            .lines()
            .filter_map(|line| {
                let line = line.strip_prefix("# ").unwrap_or(line);
                line.strip_prefix(key.as_str())?.strip_prefix(" = ")
            })
            .collect();
        assert!(!shown.is_empty(), "contrib/kiln.toml does not show {key:?}");
        if let Some(default) = default {
            assert!(
                shown.contains(&default.as_str()),
                "contrib/kiln.toml shows {key} = {shown:?}, but its default is {default}"
            );
        }
    }
}
