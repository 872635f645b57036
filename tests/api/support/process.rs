//! Real processes for the scenario tests: `rtpd` subcommands, the mock
//! downstream, `rtpd dev`, and polling their HTTP answers.

pub use super::free_port;
use serde_json::Value;
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Kills the child when dropped, so a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn wait_http_ok(url: &str, within: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} did not answer within {within:?}");
}

pub fn rtpd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rtpd"))
}

/// `rtpd mock-downstream` that always succeeds, plus any extra flags.
pub fn spawn_mock(port: u16, extra: &[&str]) -> Proc {
    spawn_mock_from(rtpd(), port, extra)
}

/// [`spawn_mock`] from `bin` (e.g. [`release_rtpd`]).
pub fn spawn_mock_from(mut bin: Command, port: u16, extra: &[&str]) -> Proc {
    Proc(
        bin.args([
            "mock-downstream",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--success-rate",
            "1",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

/// A mock downstream and `rtpd dev` in front of it, both answering.
pub struct DevPipeline {
    pub mock: Proc,
    pub dev: Proc,
    pub api_port: u16,
    pub mock_port: u16,
    pub base: String,
    pub api_key: String,
}

pub async fn start_dev_pipeline(dir: &Path, mock_extra: &[&str]) -> DevPipeline {
    let (api_port, mock_port) = (free_port(), free_port());
    let mock = spawn_mock(mock_port, mock_extra);
    wait_http_ok(
        &format!("http://127.0.0.1:{mock_port}/healthz"),
        Duration::from_secs(20),
    )
    .await;
    let dev = spawn_dev(dir, api_port, mock_port);
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let creds: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev-credentials.json")).unwrap())
            .unwrap();
    DevPipeline {
        mock,
        dev,
        api_port,
        mock_port,
        base,
        api_key: creds["api_key"].as_str().unwrap().to_owned(),
    }
}

/// The release build of `rtpd` when `RTPD_TEST_RELEASE_BIN` names it
/// (`scripts/test.sh` builds it and sets it), else this build's.
pub fn release_rtpd() -> Command {
    assert!(
        std::env::var_os("RTPD_TEST_NO_RELEASE").is_none(),
        "this test runs the release build of rtpd: list it in release_tests in scripts/test.sh, \
         which runs those tests after the release build"
    );
    match std::env::var_os("RTPD_TEST_RELEASE_BIN") {
        Some(bin) => Command::new(bin),
        None => {
            eprintln!(
                "RTPD_TEST_RELEASE_BIN is not set: running the debug build (scripts/test.sh sets it)"
            );
            rtpd()
        }
    }
}

pub fn spawn_dev(dir: &Path, api_port: u16, mock_port: u16) -> Proc {
    spawn_dev_with(rtpd(), dir, api_port, mock_port, &[], &[])
}

/// `rtpd dev --no-mock` from `bin`, with extra arguments and the test
/// settings and `env` on top.
pub fn spawn_dev_with(
    bin: Command,
    dir: &Path,
    api_port: u16,
    mock_port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = dev_command(bin, dir, api_port, mock_port, args, env);
    Proc(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The command [`spawn_dev_with`] runs, for a test that wants its output.
pub fn dev_command(
    mut bin: Command,
    dir: &Path,
    api_port: u16,
    mock_port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    bin.arg("dev")
        .arg("--no-mock")
        .args(args)
        // The mock's URL, unless `env` gives another (with credentials, say).
        .env(
            "RTPD_DOWNSTREAM_URL",
            format!("http://127.0.0.1:{mock_port}/process"),
        )
        .envs(env.iter().copied())
        .env("RTPD_DATA_DIR", dir)
        .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
        .env("RTPD_LOCK_DURATION_SECS", "2")
        .env("RTPD_DOWNSTREAM_TIMEOUT_SECS", "1")
        .env("RTPD_BACKOFF_BASE_SECS", "0.1")
        .env("RTPD_BACKOFF_MAX_SECS", "0.5")
        .env("RTPD_RECONCILE_INTERVAL_SECS", "0.5")
        .env("RTPD_RECONCILE_PENDING_AFTER_SECS", "2")
        .env("RTPD_LOG_LEVEL", "warn")
        .envs(env.iter().copied());
    bin
}

/// Sends SIGTERM to `p` (a graceful stop, as Container Apps does).
pub fn terminate(p: &Proc) {
    let sent = Command::new("kill")
        .arg("-TERM")
        .arg(p.0.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A mock downstream on a free port, answering.
pub async fn start_mock(extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let p = spawn_mock(port, extra);
    wait_http_ok(
        &format!("http://127.0.0.1:{port}/healthz"),
        Duration::from_secs(20),
    )
    .await;
    (p, port)
}

/// GETs `url` until its JSON answer satisfies `until`, and returns that answer;
/// fails the test after `within`. Connection errors (a process starting or
/// restarting) count as "not yet".
pub async fn poll_json(url: &str, within: Duration, until: impl Fn(&Value) -> bool) -> Value {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + within;
    let mut last = Value::Null;
    loop {
        if let Ok(r) = client.get(url).send().await
            && let Ok(v) = r.json::<Value>().await
        {
            if until(&v) {
                return v;
            }
            last = v;
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not reach the expected state within {within:?}; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mock downstream's `/calls`, retried while it is busy.
pub async fn mock_calls(mock_port: u16) -> Value {
    poll_json(
        &format!("http://127.0.0.1:{mock_port}/calls"),
        Duration::from_secs(5),
        |_| true,
    )
    .await
}

/// A redis-server of this test alone, so killing it disturbs no other test.
pub struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Append-only file, fsynced on every write: a kill loses nothing.
    aof: bool,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let mut r = OwnRedis::reserve();
        r.launch();
        r
    }

    /// A port for it, with nothing listening there yet (see [`OwnRedis::launch`]).
    pub fn reserve() -> OwnRedis {
        OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            aof: false,
        }
    }

    /// Like [`OwnRedis::start`], with an append-only file fsynced on every
    /// write: killed and launched again, it comes back with its data.
    pub fn start_persistent() -> OwnRedis {
        let mut r = OwnRedis::reserve();
        r.aof = true;
        r.launch();
        r
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on the same port: empty, without persistence,
    /// unless started persistent (then with the data it had).
    pub fn launch(&mut self) {
        let persistence: &[&str] = if self.aof {
            &[
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ]
        } else {
            &["--save", "", "--appendonly", "no"]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run scripts/redis.sh start FILE once (it installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(c) = redis::Client::open(self.url())
                && let Ok(mut con) = c.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("own redis-server on port {} did not come up", self.port);
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server: stopped, it
    /// keeps its connections and answers nothing.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("not running").id();
        let ok = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every journal entry under the local store, in no particular order.
pub fn read_journal(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("objects").join("outcomes")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if let Ok(text) = std::fs::read_to_string(e.path()) {
                out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
            }
        }
    }
    out
}

/// The well-known Azurite account key.
pub const AZURITE_DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// An Azurite of this test alone on `port`, keeping its data in `data`.
pub fn start_azurite(port: u16, data: &Path) -> Proc {
    let main = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/azurite/node_modules/azurite/dist/src/blob/main.js"
    );
    assert!(
        Path::new(main).is_file(),
        "Azurite is not installed: run scripts/test.sh (npm ci in azurite/)"
    );
    let child = Command::new("node")
        .arg(main)
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
        ])
        .arg(data)
        .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("node runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "Azurite did not start on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Proc(child)
}

/// The connection string of an Azurite started by [`start_azurite`].
pub fn azurite_connection_string_on(port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_DEV_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
}

/// Stops an Azurite with SIGTERM (it saves its metadata then; a kill -9
/// would lose blobs it had acknowledged) and reaps it.
pub fn stop_azurite(p: &mut Proc) {
    let stopped = Command::new("kill")
        .arg("-TERM")
        .arg(p.0.id().to_string())
        .status()
        .unwrap();
    assert!(stopped.success());
    p.0.wait().unwrap();
}
