//! A real OpenSSH server on loopback for `ssh-ng://` tests: a host key and
//! a client key generated for the test, one authorized key whose forced
//! command is the test's (what README tells operators to put in
//! `authorized_keys`), nothing else accepted. Killed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The running server.
pub struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn keygen(path: &Path) -> Result<(), String> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-test", "-f"])
        .arg(path)
        .output()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Sshd {
    /// Starts `/usr/sbin/sshd` on 127.0.0.1 with `forced_command` as the
    /// only thing the generated client key may run.
    pub fn start(forced_command: &str) -> Result<Sshd, String> {
        if !Path::new("/usr/sbin/sshd").exists() {
            return Err(
                "/usr/sbin/sshd is not installed (openssh-server; `make deps` installs it)".into(),
            );
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let host_key = dir.path().join("host_key");
        let client_key = dir.path().join("client_key");
        keygen(&host_key)?;
        keygen(&client_key)?;
        let client_pub =
            std::fs::read_to_string(client_key.with_extension("pub")).map_err(|e| e.to_string())?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(
            &authorized,
            format!(
                "restrict,command=\"{}\" {}",
                forced_command.replace('"', "\\\""),
                client_pub
            ),
        )
        .map_err(|e| e.to_string())?;
        // A free port: bound and released; sshd takes it right after.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {}\n\
                 AuthorizedKeysFile {}\n\
                 PidFile none\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\n\
                 PermitRootLogin forced-commands-only\n\
                 AllowTcpForwarding no\n\
                 X11Forwarding no\n\
                 LogLevel ERROR\n",
                host_key.display(),
                authorized.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        std::fs::create_dir_all("/run/sshd").map_err(|e| format!("/run/sshd: {e}"))?;
        let log = std::fs::File::create(dir.path().join("sshd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting sshd: {e}"))?;
        let mut sshd = Sshd { child, port, dir };
        let known_hosts = format!(
            "[127.0.0.1]:{port} {}",
            std::fs::read_to_string(host_key.with_extension("pub")).map_err(|e| e.to_string())?
        );
        std::fs::write(sshd.known_hosts(), known_hosts).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                return Err(format!("sshd exited ({status}): {}", sshd.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("sshd did not listen: {}", sshd.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// The client's private key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What sshd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The store URL for Nix (the port comes through [`Sshd::nix_env`]).
    pub fn store_url(&self) -> String {
        format!(
            "ssh-ng://root@127.0.0.1?ssh-key={}",
            self.client_key().display()
        )
    }

    /// Options every ssh that Nix starts gets (`NIX_SSHOPTS`): the port, the
    /// known host key, no prompts.
    pub fn ssh_options(&self) -> String {
        format!(
            "-p {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes",
            self.port,
            self.known_hosts().display()
        )
    }

    /// Environment for Nix commands that use this server.
    pub fn nix_env(&self) -> Vec<(String, String)> {
        vec![("NIX_SSHOPTS".to_owned(), self.ssh_options())]
    }

    /// A `builders` line: this server for x86_64-linux, one job, with
    /// `features` as its supported system features.
    pub fn builders_line(&self, features: &[&str]) -> String {
        let features = if features.is_empty() {
            "-".to_owned()
        } else {
            features.join(",")
        };
        format!(
            "ssh-ng://root@127.0.0.1 x86_64-linux {} 1 1 {features} - -",
            self.client_key().display()
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
