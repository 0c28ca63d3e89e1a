//! What test builds are made of: the busybox toolset as a store path, and
//! the Nix-shaped request the builds run.

use std::path::Path;

use kiln::proto::{snix_build, snix_castore};

/// The store basename busybox gets in test requests.
pub const BUSYBOX: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";

/// Applets linked next to busybox in the toolset.
pub const APPLETS: &[&str] = &[
    "cat", "echo", "env", "ln", "ls", "mkdir", "sh", "sleep", "test", "touch", "grep", "id",
    "hostname", "pwd", "true", "false", "kill", "dd", "head", "wc", "rm", "chmod", "yes", "sort",
    "ip", "wget", "nslookup", "timeout",
];

/// Puts a copy of `busybox` into `bin` with a symlink per applet.
pub fn install_busybox(bin: &Path, busybox: &Path, applets: &[&str]) {
    std::fs::create_dir_all(bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    for applet in applets.iter().filter(|a| **a != "busybox") {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
}

/// Every applet `busybox` has.
pub fn all_applets(busybox: &Path) -> Vec<String> {
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The toolset tree (`bin/busybox` and [`APPLETS`]) under `root`, to be
/// ingested as the [`BUSYBOX`] input.
pub fn busybox_tree(root: &Path) {
    install_busybox(
        &root.join("bin"),
        Path::new(kiln::guest_image::DEFAULT_BUSYBOX),
        APPLETS,
    );
}

/// A Nix-shaped `snix.build.v1` request running `script` with the toolset's
/// sh: `busybox` is the toolset entry (named [`BUSYBOX`]); output `i` is in
/// `$out` (i = 0) or `$out<i>`.
pub fn nix_request(
    busybox: snix_castore::Entry,
    script: &str,
    outputs: &[&str],
) -> snix_build::BuildRequest {
    let sh = format!("/nix/store/{BUSYBOX}/bin/sh");
    let mut env = vec![
        ("HOME".to_string(), "/homeless-shelter".to_string()),
        ("PATH".to_string(), format!("/nix/store/{BUSYBOX}/bin")),
        ("TMPDIR".to_string(), "/build".to_string()),
    ];
    for (i, o) in outputs.iter().enumerate() {
        let key = if i == 0 {
            "out".to_string()
        } else {
            format!("out{i}")
        };
        env.push((key, format!("/{o}")));
    }
    env.sort();
    snix_build::BuildRequest {
        inputs: vec![busybox],
        command_args: vec![sh, "-c".into(), script.into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: outputs.iter().map(|o| o.to_string()).collect(),
        environment_vars: env
            .into_iter()
            .map(|(key, v)| snix_build::build_request::EnvVar {
                key,
                value: v.into_bytes().into(),
            })
            .collect(),
        constraints: Some(snix_build::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![],
    }
}

/// The store basename the syscall probe gets in test requests (sorts after
/// [`BUSYBOX`]).
pub const PROBE: &str = "2bcdfghijklmnpqrsvwxyz0123456789-syscall-probe";

/// `tests/fixtures/syscall-probe.c` compiled statically to
/// `root/bin/syscall-probe`, so it runs in a VM or a Nix sandbox with no
/// libc; returns the binary's path.
pub fn syscall_probe(root: &Path) -> std::path::PathBuf {
    let source = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/syscall-probe.c"
    );
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let binary = bin.join("syscall-probe");
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(source)
        .output()
        .expect("gcc, which building kiln needs anyway");
    assert!(
        out.status.success(),
        "compiling {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}
