//! Installing the egress policy ([`super::policy`]) with `nft`, in the
//! network namespace kiln runs in, for as long as kiln serves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::policy::{EgressPolicy, TABLE_PREFIX};

/// The binary kiln looks for.
pub const NFT_BINARY: &str = "nft";

/// Why the table could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `nft` could not be run.
    #[error("running {binary}")]
    Run {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the table.
    #[error("{binary} refused the egress table: {stderr}")]
    Refused {
        /// The binary.
        binary: PathBuf,
        /// What it said.
        stderr: String,
    },
}

/// The installed table; dropping it removes the table.
#[derive(Debug)]
pub struct Firewall {
    binary: PathBuf,
    table: String,
}

impl Firewall {
    /// Installs `policy` as this process's table (`kiln_<pid>`), after
    /// removing the tables of kiln processes that are gone (a crashed kiln
    /// cannot remove its own).
    pub fn install(binary: &Path, policy: &EgressPolicy) -> Result<Firewall, FirewallError> {
        sweep(binary);
        let table = format!("{TABLE_PREFIX}{}", std::process::id());
        nft(binary, &policy.ruleset(&table))?;
        Ok(Firewall {
            binary: binary.to_path_buf(),
            table,
        })
    }

    /// Replaces the installed table with `policy`'s, atomically (`nft -f`
    /// of the whole table): running builds' helpers are policed by the new
    /// rules from then on. On an error the old table stays.
    pub fn replace(&self, policy: &EgressPolicy) -> Result<(), FirewallError> {
        nft(&self.binary, &policy.ruleset(&self.table))
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.binary, &format!("delete table inet {}\n", self.table)) {
            tracing::warn!(error = %e, table = %self.table, "removing the egress table failed");
        }
    }
}

/// Deletes `inet kiln_<pid>` tables whose process no longer exists.
fn sweep(binary: &Path) {
    let Ok(out) = Command::new(binary).args(["list", "tables"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.strip_prefix("table inet ") else {
            continue;
        };
        let Some(pid) = name.strip_prefix(TABLE_PREFIX) else {
            continue;
        };
        let alive = pid
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            match nft(binary, &format!("delete table inet {name}\n")) {
                Ok(()) => tracing::info!(table = name, "removed a stale egress table"),
                Err(e) => {
                    tracing::warn!(table = name, error = %e, "removing a stale egress table failed")
                }
            }
        }
    }
}

/// Runs `nft -f -` with `script` on stdin.
fn nft(binary: &Path, script: &str) -> Result<(), FirewallError> {
    let run = |source| FirewallError::Run {
        binary: binary.to_path_buf(),
        source,
    };
    let mut child = Command::new(binary)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(run)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(run)?;
    }
    let out = child.wait_with_output().map_err(run)?;
    if !out.status.success() {
        return Err(FirewallError::Refused {
            binary: binary.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
