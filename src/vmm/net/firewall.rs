//! Installing the egress policy ([`super::policy`]) with `nft`, in the
//! network namespace kiln runs in, for as long as kiln serves.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::policy::{EgressPolicy, TABLE};

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
}

impl Firewall {
    /// Replaces any `inet kiln` table with `policy`'s, atomically.
    pub fn install(binary: &Path, policy: &EgressPolicy) -> Result<Firewall, FirewallError> {
        nft(binary, &policy.ruleset())?;
        Ok(Firewall {
            binary: binary.to_path_buf(),
        })
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = nft(&self.binary, &format!("delete table inet {TABLE}\n")) {
            tracing::warn!(error = %e, "removing the egress table failed");
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
