//! Credential rotation under a running `rtpd api`: the files named by
//! `RTPD_VENDOR_KEYS_FILE` and `RTPD_ADMIN_TOKENS_FILE` are re-read when they
//! change (polled) and at once on SIGHUP; a bad new file keeps the
//! credentials in use and is reported once. Real process, real sockets.

use crate::support::process::{Proc, free_port, rtpd, wait_http_ok};
use rtp_durability::auth::hash_secret;
use serde_json::json;
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const OLD_KEY: &str = "rotation-old-vendor-key";
const NEW_KEY: &str = "rotation-new-vendor-key";
const OLD_TOKEN: &str = "rotation-old-admin-token";
const NEW_TOKEN: &str = "rotation-new-admin-token";
/// The log line a refused credential file produces.
const REFUSED: &str = "new credentials refused; keeping the ones in use";

/// Replaces a file the way a mounted secret volume does: the new content
/// appears whole (write aside, then rename over it).
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn vendor_line(key: &str) -> String {
    format!("acme:sha256:{}\n", hash_secret(key))
}

fn admin_line(token: &str) -> String {
    format!("ops:sha256:{}\n", hash_secret(token))
}

struct Api {
    proc: Proc,
    base: String,
    log: PathBuf,
    keys: PathBuf,
    tokens: PathBuf,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// `rtpd api` with credentials only in files, re-read every `poll` seconds.
async fn start_api(poll: &str) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("vendor-keys");
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&keys, vendor_line(OLD_KEY)).unwrap();
    std::fs::write(&tokens, admin_line(OLD_TOKEN)).unwrap();
    let log = dir.path().join("rtpd.log");
    let port = free_port();
    let proc = Proc(
        rtpd()
            .arg("api")
            .env("RTPD_DATA_DIR", dir.path().join("data"))
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("RTPD_VENDOR_KEYS_FILE", &keys)
            .env("RTPD_ADMIN_TOKENS_FILE", &tokens)
            .env("RTPD_CREDENTIALS_POLL_SECS", poll)
            .env("RTPD_LOG_FORMAT", "json")
            // rtpd logs to stdout.
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    Api {
        proc,
        base,
        log,
        keys,
        tokens,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Api {
    async fn post_with_key(&self, key: &str, id: &str) -> u16 {
        self.client
            .post(format!("{}/v1/transactions", self.base))
            .header("X-Api-Key", key)
            .json(&json!({"transaction_id": id}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn list_with_token(&self, token: &str) -> u16 {
        self.client
            .get(format!("{}/v1/transactions", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Asks until `check` answers `want`; fails after `within`.
    async fn until<F, Fut>(&self, what: &str, within: Duration, want: u16, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = u16>,
    {
        let deadline = Instant::now() + within;
        loop {
            let got = check().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still {got} after {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn refusals(&self) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(REFUSED))
            .count()
    }

    fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.proc.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

#[tokio::test]
async fn rotated_credential_files_apply_without_a_restart_and_a_bad_file_keeps_the_old_ones() {
    let api = start_api("0.2").await;
    assert_eq!(api.post_with_key(OLD_KEY, "ROT-1").await, 202);
    assert_eq!(api.post_with_key(NEW_KEY, "ROT-2").await, 401);
    assert_eq!(api.list_with_token(OLD_TOKEN).await, 200);

    // Rotate the vendor key: the new one is accepted once the file is re-read,
    // and from then on the old one is refused.
    replace(&api.keys, &vendor_line(NEW_KEY));
    api.until("new vendor key", Duration::from_secs(20), 202, || {
        api.post_with_key(NEW_KEY, "ROT-3")
    })
    .await;
    assert_eq!(api.post_with_key(OLD_KEY, "ROT-4").await, 401);

    // Rotate the admin token the same way.
    replace(&api.tokens, &admin_line(NEW_TOKEN));
    api.until("new admin token", Duration::from_secs(20), 200, || {
        api.list_with_token(NEW_TOKEN)
    })
    .await;
    assert_eq!(api.list_with_token(OLD_TOKEN).await, 401);

    // A broken file is refused whole: the keys in use stay, one error says why.
    replace(
        &api.keys,
        &format!("{}acme:sha256:not-a-hash\n", vendor_line(OLD_KEY)),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.refusals() == 0 {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            api.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.post_with_key(NEW_KEY, "ROT-5").await, 202);
    assert_eq!(
        api.post_with_key(OLD_KEY, "ROT-6").await,
        401,
        "nothing of the bad file was applied"
    );
    // Several more polls of the same bad file: still one error.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.refusals(), 1, "{}", api.log_text());
    let line = api
        .log_text()
        .lines()
        .find(|l| l.contains(REFUSED))
        .unwrap()
        .to_owned();
    assert!(line.contains("RTPD_VENDOR_KEYS_FILE"), "{line}");
    assert!(line.contains("\"level\":\"ERROR\""), "{line}");

    // An empty file would lock every vendor out: refused too.
    replace(&api.keys, "# nothing\n");
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.refusals() < 2 {
        assert!(Instant::now() < deadline, "{}", api.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(api.post_with_key(NEW_KEY, "ROT-7").await, 202);

    // Fixed: applied, and the keys never reached the log.
    replace(&api.keys, &vendor_line(OLD_KEY));
    api.until("fixed file", Duration::from_secs(20), 202, || {
        api.post_with_key(OLD_KEY, "ROT-8")
    })
    .await;
    let log = api.log_text();
    for secret in [OLD_KEY, NEW_KEY, OLD_TOKEN, NEW_TOKEN] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[tokio::test]
async fn sighup_rereads_the_credential_files_at_once() {
    // No polling: only the signal re-reads the files.
    let mut api = start_api("0").await;
    replace(&api.keys, &vendor_line(NEW_KEY));
    replace(&api.tokens, &admin_line(NEW_TOKEN));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api.post_with_key(NEW_KEY, "HUP-1").await, 401, "not yet");
    assert_eq!(api.post_with_key(OLD_KEY, "HUP-2").await, 202);

    api.sighup();
    api.until("after SIGHUP", Duration::from_secs(10), 202, || {
        api.post_with_key(NEW_KEY, "HUP-3")
    })
    .await;
    assert_eq!(api.post_with_key(OLD_KEY, "HUP-4").await, 401);
    assert_eq!(api.list_with_token(NEW_TOKEN).await, 200);
    assert_eq!(api.list_with_token(OLD_TOKEN).await, 401);
    // The signal did not end the process (SIGHUP's default action would).
    assert!(api.proc.0.try_wait().unwrap().is_none(), "rtpd exited");
    wait_http_ok(&format!("{}/healthz", api.base), Duration::from_secs(5)).await;
}
