//! The client-side `kiln` subcommands: `build`, `castore import|export`,
//! `builds`, `cancel`, `logs` (operators), `doctor`, and `kiln serve`'s
//! config file (`serve_config`). `main.rs` only parses arguments and calls
//! into here.

pub mod admin;
pub mod build;
pub mod castore;
pub mod doctor;
pub mod drv;
pub mod serve_config;

use tonic::transport::Channel;

pub use crate::client::{ClientSecurity, ClientSecurityOptions, ConnectError as ClientError};

/// Connects to a kiln server without TLS or credentials; the forms of `addr`
/// are those of [`crate::client`]. Commands that take the client's security
/// flags use [`crate::client::connect`].
pub async fn connect(addr: &str) -> Result<Channel, ClientError> {
    crate::client::connect(addr, &ClientSecurity::none())
        .await
        .map(crate::client::KilnChannel::into_inner)
}
