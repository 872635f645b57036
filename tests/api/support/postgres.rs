//! PostgreSQL for tests: the server the test script starts (a fresh schema
//! or database per test), ledgers on it, and servers of a test's own
//! (`scripts/postgres.sh`) for tests that stop and restart the database.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

/// The PostgreSQL the test script starts (`scripts/postgres.sh`). Tests that
/// need it fail loudly without it: run them through `scripts/test.sh`.
pub fn url() -> String {
    std::env::var("RTPD_TEST_POSTGRES_URL")
        .expect("RTPD_TEST_POSTGRES_URL is not set: run the tests with scripts/test.sh, which starts PostgreSQL (or: scripts/postgres.sh start FILE; set -a; . FILE)")
}

/// A plain client to the database at `url` (test set-up and checks).
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A fresh schema in the test database, and a URL whose connections use it
/// (`search_path`), so each test has its own tables.
pub async fn schema_url() -> String {
    new_schema().await.0
}

/// As [`schema_url`], with the schema's name.
pub async fn new_schema() -> (String, String) {
    let base = url();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    client(&base)
        .await
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    (with_search_path(&base, &schema), schema)
}

/// Drops everything in `schema` (a lost database), leaving it empty.
pub async fn wipe_schema(schema: &str) {
    client(&url())
        .await
        .batch_execute(&format!(
            "DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap();
}

pub fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}")
}

/// A fresh database on the test server (for measurements that
/// pg_stat_statements groups by database), and its URL.
pub async fn database_url() -> (String, String) {
    let base = url();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    client(&base)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').expect("database in the URL");
    (format!("{prefix}/{name}"), name)
}

/// A PostgreSQL ledger on a fresh schema of the test server.
pub async fn ledger(
    retention: Option<Duration>,
) -> rtp_durability::ledger::postgres::PostgresLedger {
    ledger_at(&schema_url().await, retention)
}

pub fn ledger_at(
    url: &str,
    retention: Option<Duration>,
) -> rtp_durability::ledger::postgres::PostgresLedger {
    use rtp_durability::ledger::postgres::{
        DEFAULT_POOL_SIZE, DEFAULT_TIMEOUT, PostgresLedger, PostgresSettings,
    };
    PostgresLedger::connect(&PostgresSettings {
        url: url.into(),
        entra: false,
        client_id: None,
        retention,
        timeout: DEFAULT_TIMEOUT,
        pool_size: DEFAULT_POOL_SIZE,
        payload: false,
    })
    .unwrap()
}

/// A PostgreSQL server of one test alone (`scripts/postgres.sh`), so
/// stopping it disturbs no other test. Stopped and removed when dropped.
pub struct OwnPostgres {
    env: PathBuf,
    pub url: String,
    _dir: tempfile::TempDir,
}

fn script(cmd: &str, env: &Path) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
    let out = Command::new(script).arg(cmd).arg(env).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/postgres.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OwnPostgres {
    pub fn start() -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let env = dir.path().join("postgres.env");
        script("start", &env);
        let url = std::fs::read_to_string(&env)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RTPD_TEST_POSTGRES_URL="))
            .expect("the env file names the URL")
            .to_owned();
        OwnPostgres {
            env,
            url,
            _dir: dir,
        }
    }

    /// Kills the server as a crash would; the data stays.
    pub fn down(&self) {
        script("down", &self.env);
    }

    /// Starts it again: same port, same data (crash recovery runs).
    pub fn up(&self) {
        script("up", &self.env);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/postgres.sh");
        let _ = Command::new(script).arg("stop").arg(&self.env).output();
    }
}
