//! PostgreSQL, shared by several kiln hosts (`kiln serve --database
//! postgres://…`): directories, path infos, grants, result records, and
//! build records with their logs.
//!
//! One [`Database`] per process: a connection pool (deadpool) that drops a
//! broken connection and opens a new one on the next call, so a restarted
//! server is reconnected to without kiln restarting. [`Database::connect`]
//! runs the schema migrations ([`migrations`]) before anything else touches
//! the database, under an advisory lock, so hosts starting together apply
//! each migration once.
//!
//! Errors name the database by [`Database::name`]: the URL without its
//! password, which never reaches a log or a client.

pub mod migrations;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// How long a call waits for a connection (a new one included) before it
/// fails as unavailable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per host: enough for the castore calls and the build records
/// written at once; PostgreSQL's default limit is 100 for all hosts.
pub const POOL_SIZE: usize = 16;

/// A failed database call.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The address is not a PostgreSQL URL kiln can use.
    #[error("database address {address:?}: {problem}")]
    Address {
        /// The address, password removed.
        address: String,
        /// What is wrong with it.
        problem: String,
    },
    /// No connection could be had: the server is down, unreachable, or
    /// refused kiln.
    #[error("database {name} is unavailable: {message}")]
    Unavailable {
        /// [`Database::name`].
        name: String,
        /// Why, as the driver says.
        message: String,
    },
    /// A statement failed.
    #[error("database {name}: {context}: {source}")]
    Query {
        /// [`Database::name`].
        name: String,
        /// What kiln was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A migration failed; the schema is left at the last one that applied.
    #[error("database {name}: schema migration {version} failed: {source}")]
    Migration {
        /// [`Database::name`].
        name: String,
        /// The migration.
        version: i32,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The database holds a schema newer than this kiln knows.
    #[error(
        "database {name} has schema version {found}, newer than this kiln's {known}: upgrade kiln"
    )]
    NewerSchema {
        /// [`Database::name`].
        name: String,
        /// The version found.
        found: i32,
        /// The newest this kiln knows.
        known: i32,
    },
}

impl DbError {
    /// Whether the database could not be reached (as opposed to a statement
    /// it refused): callers answer UNAVAILABLE for these.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable { .. } => true,
            Self::Query { source, .. } | Self::Migration { source, .. } => lost(source),
            _ => false,
        }
    }
}

/// Whether `e` says the connection or the server went away, rather than
/// that a statement was refused: the connection closed, no SQLSTATE (an
/// I/O failure), class 08 (connection exception) or 57P (the server
/// shutting down, crashed, or still starting).
fn lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_none_or(|code| {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P")
        })
}

/// A pool of connections to one PostgreSQL database. Cheap to clone.
#[derive(Clone)]
pub struct Database {
    pool: Pool,
    name: String,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("name", &self.name)
            .finish()
    }
}

impl Database {
    /// Opens a pool to `address` (`postgres://user[:password]@host[:port]/db`,
    /// or any form `tokio_postgres::Config` parses) and migrates the schema.
    /// The first connection is retried for up to `wait`, so a host can start
    /// while the database is still coming up.
    pub async fn connect(address: &str, wait: Duration) -> Result<Database, DbError> {
        let config: tokio_postgres::Config =
            address
                .parse()
                .map_err(|e: tokio_postgres::Error| DbError::Address {
                    address: redact(address),
                    problem: e.to_string(),
                })?;
        let mut config = config;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("kiln");
        // Verified: a connection is checked with an empty query before it
        // is handed out again, so one the server dropped while it sat idle
        // (a restart) is replaced instead of failing the next call; the
        // connection's own task may not have seen the server go yet.
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Address {
                address: redact(address),
                problem: e.to_string(),
            })?;
        let db = Database {
            pool,
            name: redact(address),
        };
        let give_up = tokio::time::Instant::now() + wait;
        loop {
            match db.client().await {
                Ok(_) => break,
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::info!(database = %db.name, error = %e, "waiting for the database");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        migrations::migrate(&db).await?;
        Ok(db)
    }

    /// The database's address without its password, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection from the pool (a new one if the pool has none alive).
    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.pool.get().await.map_err(|e| DbError::Unavailable {
            name: self.name.clone(),
            message: match e {
                deadpool_postgres::PoolError::Backend(e) => e.to_string(),
                deadpool_postgres::PoolError::Timeout(_) => {
                    format!("no connection within {CONNECT_TIMEOUT:?}")
                }
                other => other.to_string(),
            },
        })
    }

    /// A [`DbError::Query`] of this database, for `map_err`.
    pub fn query_error(
        &self,
        context: &'static str,
    ) -> impl Fn(tokio_postgres::Error) -> DbError + '_ {
        move |source| {
            if lost(&source) {
                DbError::Unavailable {
                    name: self.name.clone(),
                    message: format!("{context}: connection lost: {source}"),
                }
            } else {
                DbError::Query {
                    name: self.name.clone(),
                    context,
                    source,
                }
            }
        }
    }
}

/// `address` with any password replaced by `***`.
pub fn redact(address: &str) -> String {
    // postgres://user:password@host/...: the password is between the first
    // ':' after the scheme and the last '@' of the authority.
    let Some((scheme, rest)) = address.split_once("://") else {
        return address.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some(at) = authority.rfind('@') else {
        return address.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}{tail}"),
        None => address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://kiln:s3cret@db:5432/kiln"),
            "postgres://kiln:***@db:5432/kiln"
        );
        assert_eq!(
            redact("postgres://kiln@127.0.0.1:5432/kiln?sslmode=disable"),
            "postgres://kiln@127.0.0.1:5432/kiln?sslmode=disable"
        );
        assert_eq!(
            redact("host=/run/postgresql user=kiln"),
            "host=/run/postgresql user=kiln"
        );
    }

    #[tokio::test]
    async fn a_malformed_address_is_named() {
        let e = Database::connect("postgres://kiln@[::1/x", Duration::ZERO)
            .await
            .expect_err("malformed");
        assert!(matches!(e, DbError::Address { .. }), "{e}");
    }
}
