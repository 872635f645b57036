//! Test helpers: `spawn_app()` runs the API on port 0 with embedded backends
//! and a real mock downstream on port 0; typed request helpers; Azurite access.
//! Real processes (`rtpd`, the mock downstream) live in [`process`]; a
//! console client (session cookie, CSRF token) in [`console`];
//! PostgreSQL databases, schemas and servers for tests in [`postgres`]; an
//! OTLP/HTTP receiver in [`otlp`]; an object store a test takes down or
//! slows in [`stores`].

pub mod console;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod stores;

use rtp_durability::api::rejected::RejectedCall;
use rtp_durability::app::Application;
use rtp_durability::auth::{Auth, hash_secret};
use rtp_durability::config::{Secret, Settings};
use rtp_durability::mock_downstream::{Mock, MockOptions};
use rtp_durability::processor::{Outcome, Processor};
use rtp_durability::services::Services;
use rtp_durability::transaction::{State, TxRecord};
use rtp_durability::wal::azure::{AzureBlobSettings, AzureBlobStore};
use serde_json::Value;
use std::{net::TcpListener, sync::Arc, time::Duration};

pub const API_KEY: &str = "test-vendor-key";
/// The vendor whose key is [`API_KEY`].
pub const VENDOR: &str = "acme";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// A vendor that signs its requests with HMAC-SHA256.
pub const HMAC_VENDOR: &str = "globex";
pub const HMAC_SECRET: &str = "test-hmac-secret-0123456789";

pub struct TestApp {
    pub address: String,
    pub mock_address: String,
    pub services: Arc<Services>,
    pub processor: Processor,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub type Tweak = Box<dyn FnOnce(&mut Settings) + Send>;

pub struct AppOptions {
    pub mock: MockOptions,
    pub max_retries: u32,
    pub lock_secs: f64,
    pub downstream_timeout_secs: f64,
    /// Last word on the settings (backends, limits).
    pub tweak: Option<Tweak>,
    /// Run the ledger on this Redis (a fresh key prefix per app) instead of
    /// the embedded one.
    pub redis_url: Option<String>,
    /// Last word on the settings (limits, windows) before the app starts.
    pub configure: fn(&mut Settings),
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            mock: MockOptions {
                success_rate: 1.0,
                hang: Duration::from_secs(5),
                ..Default::default()
            },
            max_retries: 5,
            lock_secs: 2.0,
            downstream_timeout_secs: 1.0,
            tweak: None,
            redis_url: None,
            configure: |_| {},
        }
    }
}

pub fn test_settings(dir: &std::path::Path) -> Settings {
    // HMAC secrets come only from a file (a mounted secret in production).
    let keys_file = dir.join("vendor-keys");
    std::fs::write(&keys_file, format!("{HMAC_VENDOR}:hmac:{HMAC_SECRET}\n")).unwrap();
    Settings {
        vendor_keys_file: Some(keys_file),
        data_dir: dir.to_owned(),
        http_addr: ([127, 0, 0, 1], 0).into(),
        backoff_base_secs: 0.05,
        backoff_max_secs: 0.2,
        vendor_keys: Some(Secret::from(
            format!("acme:sha256:{}", hash_secret(API_KEY)).as_str(),
        )),
        admin_tokens: Some(Secret::from(
            format!("ops:sha256:{}", hash_secret(ADMIN_TOKEN)).as_str(),
        )),
        ..Settings::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(o: AppOptions) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let (mock_server, mock_port) = Mock::new(o.mock)
        .serve(TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    tokio::spawn(mock_server);
    let mut settings = test_settings(dir.path());
    settings.downstream_url = format!("http://127.0.0.1:{mock_port}/process")
        .parse()
        .unwrap();
    settings.max_retries = o.max_retries;
    settings.lock_duration_secs = o.lock_secs;
    settings.downstream_timeout_secs = o.downstream_timeout_secs;
    (o.configure)(&mut settings);
    if let Some(t) = o.tweak {
        t(&mut settings);
    }
    if let Some(url) = o.redis_url {
        settings.ledger = rtp_durability::config::LedgerKind::Redis;
        settings.redis_url = Secret::from(url.as_str());
        settings.redis_key_prefix = redis_key_prefix();
    }
    settings.validate().unwrap();
    let services = Arc::new(Services::build(&settings).await.unwrap());
    // As `rtpd serve` does: a new ledger is rebuilt (over the empty WAL) and marked.
    services.rebuild_ledger_at_start().await;
    let auth = Auth::from_settings(&settings).unwrap();
    let app = Application::build_with_listener(
        services.api_state(auth),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    )
    .unwrap();
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    let processor = services.processor().unwrap();
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        mock_address: format!("http://127.0.0.1:{mock_port}"),
        services,
        processor,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

impl TestApp {
    /// Where the embedded backends keep their data (for `rtpd` CLI runs).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        content_type: &str,
        key: Option<&str>,
    ) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}/v1/transactions", self.address))
            .header("Content-Type", content_type)
            .body(body);
        if let Some(k) = key {
            r = r.header("X-Api-Key", k);
        }
        r.send().await.unwrap()
    }

    /// POSTs `body` signed as [`HMAC_VENDOR`] at unix time `ts`.
    pub async fn post_signed(&self, body: &str, ts: i64) -> reqwest::Response {
        let sig = rtp_durability::auth::sign(HMAC_SECRET.as_bytes(), ts, body.as_bytes()).unwrap();
        self.post_with_signature(body, ts, &sig).await
    }

    pub async fn post_with_signature(&self, body: &str, ts: i64, sig: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/transactions", self.address))
            .header("Content-Type", "application/json")
            .header("X-Rtpd-Vendor", HMAC_VENDOR)
            .header("X-Rtpd-Timestamp", ts.to_string())
            .header("X-Rtpd-Signature", sig)
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    pub async fn post_json(&self, body: &Value) -> reqwest::Response {
        self.post_raw(body.to_string(), "application/json", Some(API_KEY))
            .await
    }

    pub async fn get_tx(&self, id: &str) -> reqwest::Response {
        self.client
            .get(format!("{}/v1/transactions/{id}", self.address))
            .header("X-Api-Key", API_KEY)
            .send()
            .await
            .unwrap()
    }

    /// `/metrics` in the Prometheus text format.
    pub async fn prometheus(&self) -> String {
        prometheus_at(&self.client, &self.address, Some(ADMIN_TOKEN)).await
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    pub async fn admin_post(&self, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut r = self
            .client
            .post(format!("{}{path}", self.address))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    /// The ledger entry of `id`: a key as given when it has a `/`, else the
    /// transaction of that id from the API-key vendor, the signing vendor,
    /// or no vendor, in that order.
    pub async fn record(&self, id: &str) -> TxRecord {
        self.find(id).await.expect("transaction in ledger")
    }

    pub async fn find(&self, id: &str) -> Option<TxRecord> {
        let keys = if id.contains('/') {
            vec![id.to_owned()]
        } else {
            vec![key(id), format!("{HMAC_VENDOR}/{id}"), id.to_owned()]
        };
        for k in keys {
            if let Some(r) = self.services.ledger.get(&k).await.unwrap() {
                return Some(r);
            }
        }
        None
    }

    /// Processes until every listed transaction is terminal. Waits only inside
    /// queue receives (for scheduled retries), never by sleeping.
    pub async fn drain_until_terminal(&self, ids: &[&str]) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let mut all = true;
            for id in ids {
                if !self.record(id).await.status.is_terminal() {
                    all = false;
                }
            }
            if all {
                return outcomes;
            }
            outcomes.push(
                self.processor
                    .try_process_next(Duration::from_secs(3))
                    .await
                    .unwrap(),
            );
        }
        panic!("transactions did not reach a terminal state: {outcomes:?}");
    }

    /// Asserts the queue holds nothing receivable now.
    pub async fn assert_queue_empty(&self) {
        let got = self
            .services
            .queue
            .receive(10, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(
            got.is_empty(),
            "queue still holds {:?}",
            got.iter().map(|m| &m.message_id).collect::<Vec<_>>()
        );
    }

    pub async fn mock_calls(&self) -> Value {
        self.client
            .get(format!("{}/calls", self.mock_address))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn state_of(&self, id: &str) -> State {
        self.record(id).await.status
    }
}

/// The records of `rejected/v1` from the last hour, and their raw text.
pub async fn rejected_calls(app: &TestApp) -> (Vec<RejectedCall>, String) {
    let now = chrono::Utc::now();
    let mut calls = Vec::new();
    let mut raw = String::new();
    for seg in app
        .services
        .rejected
        .segments(
            now - chrono::Duration::hours(1),
            now + chrono::Duration::hours(1),
        )
        .await
        .unwrap()
    {
        for (_, line) in app.services.rejected.read_segment(&seg.key).await.unwrap() {
            raw.push_str(std::str::from_utf8(&line).unwrap());
            calls.push(serde_json::from_slice(&line).unwrap());
        }
    }
    (calls, raw)
}

/// The ledger key (and downstream `Idempotency-Key`) of a transaction the
/// API-key vendor sent: `<vendor>/<id>`.
pub fn key(id: &str) -> String {
    format!("{VENDOR}/{id}")
}

pub fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

pub async fn json(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

/// The Azurite connection string the test script exports. Tests that need it
/// fail loudly without it: run them through `scripts/test.sh`.
pub fn azurite_connection_string() -> String {
    std::env::var("RTPD_TEST_AZURITE_CONNECTION_STRING")
        .expect("RTPD_TEST_AZURITE_CONNECTION_STRING is not set: run the tests with scripts/test.sh, which starts Azurite")
}

/// A connection string and a fresh container name.
pub fn azurite_container() -> (String, String) {
    (
        azurite_connection_string(),
        format!("t-{}", uuid::Uuid::new_v4().simple()),
    )
}

pub async fn azurite_store_in(conn: &str, container: &str) -> AzureBlobStore {
    AzureBlobStore::connect(&AzureBlobSettings {
        connection_string: Some(conn.to_owned().into()),
        account_url: None,
        container: container.to_owned(),
        create_container: true,
        client_id: None,
    })
    .await
    .expect("connect to Azurite")
}

pub async fn azurite_store() -> AzureBlobStore {
    let (conn, container) = azurite_container();
    azurite_store_in(&conn, &container).await
}

/// The Redis the test script starts (`scripts/redis.sh`). Tests that need it
/// fail loudly without it: run them through `scripts/test.sh`.
pub fn redis_url() -> String {
    std::env::var("RTPD_TEST_REDIS_URL")
        .expect("RTPD_TEST_REDIS_URL is not set: run the tests with scripts/test.sh, which starts Redis (or: scripts/redis.sh start FILE; set -a; . FILE)")
}

/// A key prefix no other test uses.
pub fn redis_key_prefix() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

/// A port for a test server, chosen at random below the kernel's ephemeral
/// range (32768+) so no outgoing client connection can take it between
/// choosing and binding, and checked free. Random rather than counted:
/// nextest runs each test in its own process.
pub fn free_port() -> u16 {
    use rand::RngExt;
    for _ in 0..1000 {
        let port = rand::rng().random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port in 20000..32000");
}

/// `/metrics` of the service at `base` in the Prometheus text format, with
/// an admin token or without (a service with public metrics).
pub async fn prometheus_at(client: &reqwest::Client, base: &str, admin: Option<&str>) -> String {
    let mut req = client
        .get(format!("{base}/metrics"))
        .header("Accept", "text/plain");
    if let Some(token) = admin {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap().text().await.unwrap()
}
