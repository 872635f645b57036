//! Grep-level check that payloads and secrets never reach the logs: runs the
//! real `rtpd api` binary with JSON logs at debug level, sends payloads with a
//! unique marker (accepted and refused ones) and every kind of credential,
//! and searches everything the process wrote.

use rtp_durability::auth::{hash_secret, sign};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_from_logs(path: &std::path::Path) -> Option<u16> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "API listening")
        .and_then(|v| v["port"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

#[tokio::test]
async fn logs_never_contain_payloads_or_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let marker = format!("PAYLOAD-MARKER-{id}");
    let api_key = format!("rtpd_vk_logtest_{id}");
    let hmac_secret = format!("rtpd_hs_logtest_{id}");
    let admin_token = format!("rtpd_adm_logtest_{id}");
    let wrong_key = format!("rtpd_vk_wrong_{id}");
    let keys_file = dir.path().join("vendor-keys");
    std::fs::write(&keys_file, format!("signer:hmac:{hmac_secret}\n")).unwrap();
    let log_path = dir.path().join("rtpd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _child = Child(
        Command::new(env!("CARGO_BIN_EXE_rtpd"))
            .arg("api")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RTPD_HTTP_ADDR", "127.0.0.1:0")
            .env("RTPD_DATA_DIR", dir.path().join("data"))
            .env("RTPD_LOG_FORMAT", "json")
            .env("RTPD_LOG_LEVEL", "debug")
            .env(
                "RTPD_VENDOR_KEYS",
                format!("acme:sha256:{}", hash_secret(&api_key)),
            )
            .env("RTPD_VENDOR_KEYS_FILE", &keys_file)
            .env(
                "RTPD_ADMIN_TOKENS",
                format!("ops:sha256:{}", hash_secret(&admin_token)),
            )
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start rtpd api"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let port = loop {
        if let Some(p) = port_from_logs(&log_path) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "rtpd api did not start: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let post = |body: String, key: &str| {
        client
            .post(format!("{base}/v1/transactions"))
            .header("Content-Type", "application/json")
            .header("X-Api-Key", key)
            .body(body)
            .send()
    };

    let accepted = format!(r#"{{"transaction_id":"LOG-1","note":"{marker}"}}"#);
    assert_eq!(
        post(accepted.clone(), &api_key).await.unwrap().status(),
        202
    );
    assert_eq!(post(accepted, &api_key).await.unwrap().status(), 200);
    let conflict = format!(r#"{{"transaction_id":"LOG-1","note":"{marker}-2"}}"#);
    assert_eq!(post(conflict, &api_key).await.unwrap().status(), 409);
    for bad in [
        format!(r#"{{"transaction_id":"LOG-2","note":"{marker}""#),
        format!(r#"{{"transaction_id":"LOG-3","{marker}":1,"{marker}":2}}"#),
        format!(r#"{{"transaction_id":"{marker} with spaces"}}"#),
        format!(r#"["{marker}"]"#),
    ] {
        assert_eq!(post(bad, &api_key).await.unwrap().status(), 400);
    }
    let r = post(format!(r#"{{"note":"{marker}"}}"#), &wrong_key)
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let ts = chrono::Utc::now().timestamp();
    let signed = format!(r#"{{"transaction_id":"LOG-4","note":"{marker}"}}"#);
    let sig = sign(hmac_secret.as_bytes(), ts, signed.as_bytes()).unwrap();
    let send_signed = |sig: String| {
        client
            .post(format!("{base}/v1/transactions"))
            .header("Content-Type", "application/json")
            .header("X-Rtpd-Vendor", "signer")
            .header("X-Rtpd-Timestamp", ts.to_string())
            .header("X-Rtpd-Signature", sig)
            .body(signed.clone())
            .send()
    };
    assert_eq!(send_signed(sig.clone()).await.unwrap().status(), 202);
    assert_eq!(send_signed(sig.clone()).await.unwrap().status(), 401);
    let forged = sign(b"forged-secret-0123456789", ts, signed.as_bytes()).unwrap();
    assert_eq!(send_signed(forged.clone()).await.unwrap().status(), 401);

    let r = client
        .get(format!("{base}/v1/transactions"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{base}/v1/transactions"))
        .bearer_auth(&wrong_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    drop(_child);
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("transaction accepted"),
        "the log capture works: {logs}"
    );
    for (what, needle) in [
        ("payload marker", marker.as_str()),
        ("vendor API key", api_key.as_str()),
        ("HMAC secret", hmac_secret.as_str()),
        ("admin token", admin_token.as_str()),
        ("wrong key", wrong_key.as_str()),
        ("signature", sig.trim_start_matches("v1=")),
        ("forged signature", forged.trim_start_matches("v1=")),
    ] {
        let hits: Vec<&str> = logs.lines().filter(|l| l.contains(needle)).collect();
        assert!(hits.is_empty(), "the {what} appears in the logs: {hits:?}");
    }
}
