//! kiln's PostgreSQL layer against a real server started by the test:
//! migrations applied once by hosts starting together, and a restarted
//! server reconnected to without kiln restarting.

mod harness;

use std::time::Duration;

use harness::postgres::{self, Postgres};
use kiln::db::{migrations::MIGRATIONS, Database, DbError};

fn server() -> Option<Postgres> {
    if !harness::can_run(postgres::unavailable()) {
        return None;
    }
    Some(Postgres::start().expect("starting PostgreSQL"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_starting_together_migrate_once() {
    let Some(pg) = server() else { return };
    let url = pg.url();
    let (a, b) = tokio::join!(
        Database::connect(&url, Duration::from_secs(10)),
        Database::connect(&url, Duration::from_secs(10))
    );
    let (a, _b) = (a.expect("host a"), b.expect("host b"));
    let client = a.client().await.expect("client");
    let rows = client
        .query("SELECT version FROM kiln_schema ORDER BY version", &[])
        .await
        .expect("schema rows");
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let want: Vec<i32> = MIGRATIONS.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, want);
    // A third start finds nothing to do.
    Database::connect(&url, Duration::ZERO)
        .await
        .expect("again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_is_reconnected_to() {
    let Some(pg) = server() else { return };
    let db = Database::connect(&pg.url(), Duration::from_secs(10))
        .await
        .expect("connect");
    let one = |db: Database| async move {
        let c = db.client().await?;
        let row = c
            .query_one("SELECT 1::int4", &[])
            .await
            .map_err(db.query_error("select"))?;
        Ok::<i32, DbError>(row.get(0))
    };
    assert_eq!(one(db.clone()).await.expect("before"), 1);
    pg.stop().expect("stop");
    let down = one(db.clone()).await.expect_err("server is down");
    assert!(down.is_unavailable(), "{down}");
    assert!(
        down.to_string()
            .contains(&format!("127.0.0.1:{}", pg.port())),
        "{down}"
    );
    pg.start_again().expect("start again");
    assert_eq!(one(db.clone()).await.expect("after the restart"), 1);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_and_named() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let url = format!("postgres://kiln:secret@127.0.0.1:{port}/kiln");
    let e = Database::connect(&url, Duration::ZERO)
        .await
        .expect_err("nothing there");
    assert!(e.is_unavailable(), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    assert!(!text.contains("secret"), "the password leaked: {text}");
}
