//! A real PostgreSQL server for one test: a new cluster (`initdb`) in a
//! temporary directory, listening on a free loopback port, run as the
//! `postgres` user (PostgreSQL refuses root), with a `kiln` database.
//! Stopped at once (`-m immediate`) and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's PostgreSQL 15 server binaries are (`postgresql-15`).
pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Why PostgreSQL tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new(BIN_DIR).join("initdb").exists() {
        return Some(format!(
            "{BIN_DIR}/initdb is missing (Debian's postgresql-15; `make deps` installs it)"
        ));
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("starting PostgreSQL as its own user needs root".into());
    }
    if nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .is_none()
    {
        return Some("no postgres user (Debian's postgresql-15 creates it)".into());
    }
    None
}

/// A running cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(Path::new(BIN_DIR).join(program));
    c
}

impl Postgres {
    /// A new cluster, started, with an empty `kiln` database owned by the
    /// `postgres` superuser (trust authentication on loopback only).
    pub fn start() -> Result<Postgres, String> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        nix::unistd::chown(
            dir.path(),
            nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .map(|u| u.uid),
            None,
        )
        .map_err(|e| format!("chown {}: {e}", dir.path().display()))?;
        // The server reads its data directory as postgres: the temporary
        // directory's parents must let it through.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let pg = Postgres { dir, port };
        run(
            "initdb",
            as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "-N", "-E", "UTF8", "-D"])
                .arg(pg.data_dir()),
        )?;
        pg.pg_ctl_start()?;
        run(
            "createdb",
            Command::new(Path::new(BIN_DIR).join("createdb")).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "kiln",
            ]),
        )?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        run(
            "pg_ctl start",
            as_postgres("pg_ctl")
                .args(["-w", "-t", "60", "-l"])
                .arg(self.dir.path().join("server.log"))
                .arg("-D")
                .arg(self.data_dir())
                .args(["-o", &options, "start"])
                .stdout(Stdio::null()),
        )
    }

    /// The `postgres://` address of the `kiln` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/kiln", self.port)
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown: open connections are closed).
    pub fn stop(&self) -> Result<(), String> {
        run(
            "pg_ctl stop",
            as_postgres("pg_ctl")
                .args(["-w", "-m", "fast", "-D"])
                .arg(self.data_dir())
                .arg("stop")
                .stdout(Stdio::null()),
        )
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data_dir())
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A new server and a migrated pool of its `kiln` database, for a test
/// that needs one; `None` (the skip said, see [`super::can_run`]) when
/// this host cannot run PostgreSQL.
pub async fn database() -> Option<(Postgres, kiln::db::Database)> {
    if !super::can_run(unavailable()) {
        return None;
    }
    let pg = Postgres::start().expect("starting PostgreSQL");
    let db = kiln::db::Database::connect(&pg.url(), std::time::Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", pg.url(), pg.log()));
    Some((pg, db))
}
