//! Hostile and clumsy clients, from the outside probe of issue 20: slow
//! anonymous requests cannot starve vendors or probes, refusals are JSON and
//! sampled before they reach storage, HTTP conventions (HEAD, OPTIONS,
//! Bearer), no Content-Encoding, ambiguous credentials refused, private dev
//! credentials, bounded operator ranges and WAL reads.

use crate::support::process::{
    OwnRedis, Proc, mock_calls, release_rtpd, rtpd, spawn_dev_with, start_mock, wait_http_ok,
};
use crate::support::{
    ADMIN_TOKEN, API_KEY, AppOptions, HMAC_SECRET, HMAC_VENDOR, free_port, json, key, now_unix,
    rejected_calls, spawn_app, spawn_app_with,
};
use rtp_durability::replay::load_record;
use rtp_durability::transaction::State;
use serde_json::{Value, json};
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn assert_error(r: reqwest::Response, status: u16, code: &str, case: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "{case}");
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(ct.as_deref(), Some("application/json"), "{case}");
    let b: Value = r
        .json()
        .await
        .unwrap_or_else(|e| panic!("{case}: body is not JSON: {e}"));
    assert_eq!(b["error"], code, "{case}: {b}");
    b
}

/// Opens a connection, sends `head`, then one byte of filler a second for
/// as long as the server keeps it open. Returns the connection's task and a
/// receiver for the response head (`None` if the server closed silently).
fn slow_request(
    address: &str,
    head: String,
) -> tokio::task::JoinHandle<Option<(String, Duration)>> {
    slow_request_from(address, None, head)
}

/// [`slow_request`] from a chosen local address (say `127.0.0.2`, another
/// source address than the vendors' `127.0.0.1`).
fn slow_request_from(
    address: &str,
    from: Option<std::net::IpAddr>,
    head: String,
) -> tokio::task::JoinHandle<Option<(String, Duration)>> {
    let address = address.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        let stream = match from {
            None => TcpStream::connect(address).await.ok()?,
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind((ip, 0).into()).ok()?;
                socket.connect(address.parse().ok()?).await.ok()?
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            if wr.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if wr.write_all(b" ").await.is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        // Until the end of the response head.
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        writer.abort();
        let took = started.elapsed();
        (read.is_ok() && !answer.is_empty())
            .then(|| (String::from_utf8_lossy(&answer).into_owned(), took))
    })
}

/// The starvation probe: `n` anonymous replay requests that declare a
/// 100-byte body and send one byte a second.
fn slow_anonymous_replays(
    address: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Option<(String, Duration)>>> {
    (0..n)
        .map(|i| {
            let path = if i % 2 == 0 {
                format!("/replay/X-{i}")
            } else {
                format!("/v1/transactions/X-{i}/replay")
            };
            slow_request(
                address,
                format!(
                    "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
                ),
            )
        })
        .collect()
}

/// Each slow anonymous request was answered 401 (or 429 from the
/// per-source limit) at once, without its body being waited for.
async fn assert_refused_at_once(
    slow: Vec<tokio::task::JoinHandle<Option<(String, Duration)>>>,
    within: Duration,
) {
    for task in slow {
        let (answer, took) = task
            .await
            .unwrap()
            .expect("a slow anonymous request got no answer: it holds a slot");
        assert!(
            answer.starts_with("HTTP/1.1 401") || answer.starts_with("HTTP/1.1 429"),
            "{answer}"
        );
        assert!(took < within, "answered after {took:?}: {answer}");
    }
}

#[tokio::test]
async fn slow_anonymous_replays_do_not_starve_vendors() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight = 5;
            // A body read would hold its slot this long.
            s.request_timeout_secs = 60.0;
        },
        ..Default::default()
    })
    .await;
    let slow = slow_anonymous_replays(&app.address, 12);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 0..5 {
        let r = app
            .post_json(&json!({"transaction_id": format!("STARVE-{i}")}))
            .await;
        assert_eq!(
            r.status(),
            202,
            "vendor POST {i} while anonymous replays trickle"
        );
    }
    assert_refused_at_once(slow, Duration::from_secs(5)).await;
}

/// Issue 20's reproduction, against the release binary: `RTPD_MAX_IN_FLIGHT`
/// 20 and 25 slow anonymous replays; vendor POSTs still get 202.
#[tokio::test]
async fn slow_anonymous_replays_against_the_release_binary_leave_vendor_posts_202() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let _dev: Proc = spawn_dev_with(
        release_rtpd(),
        dir.path(),
        api_port,
        mock_port,
        &[],
        &[
            ("RTPD_MAX_IN_FLIGHT", "20"),
            ("RTPD_REQUEST_TIMEOUT_SECS", "60"),
        ],
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let key = creds["api_key"].as_str().unwrap().to_owned();

    let slow = slow_anonymous_replays(&base, 25);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = reqwest::Client::new();
    for i in 0..5 {
        let r = client
            .post(format!("{base}/v1/transactions"))
            .header("X-Api-Key", &key)
            .json(&json!({"transaction_id": format!("REL-{i}"), "amount": "1.00"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "vendor POST {i}");
    }
    // And the probes answer.
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_refused_at_once(slow, Duration::from_secs(5)).await;
    // The five were processed: one downstream call each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = mock_calls(mock_port).await;
        let n = (0..5)
            .filter(|i| calls["by_key"].get(format!("dev-vendor/REL-{i}")).is_some())
            .count();
        if n == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "processed {n} of 5: {calls}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Standard Webhooks secret of the test's webhook-signing vendor.
const HOOLI_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The head of a forged `X-Rtpd-*` signed POST (fresh timestamp, wrong
/// signature) declaring a 100-byte body; `extra` is more header lines.
fn forged_signed_head(extra: &str) -> String {
    format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Rtpd-Vendor: {HMAC_VENDOR}\r\nX-Rtpd-Timestamp: {}\r\n\
         X-Rtpd-Signature: v1={}\r\n{extra}Content-Length: 100\r\n\r\n{{",
        now_unix(),
        "ab".repeat(32)
    )
}

/// `n` forged signed POSTs ([`forged_signed_head`]) from `from`, each
/// trickling its body.
fn forged_signed_posts(
    address: &str,
    from: std::net::IpAddr,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Option<(String, Duration)>>> {
    (0..n)
        .map(|_| slow_request_from(address, Some(from), forged_signed_head("")))
        .collect()
}

/// A genuine HMAC-signed POST of `id` from `client`: its status.
async fn signed_post(client: &reqwest::Client, base: &str, id: &str) -> u16 {
    post_signed_with(client, base, id, HMAC_SECRET, None).await
}

/// A POST of `id` signed with `secret` (forged unless [`HMAC_SECRET`]), as a
/// proxy sends it when `forwarded_for` is given: its status.
async fn post_signed_with(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    secret: &str,
    forwarded_for: Option<&str>,
) -> u16 {
    use rtp_durability::auth::sign;
    let body = format!(r#"{{"transaction_id":"{id}"}}"#);
    let ts = now_unix();
    let sig = sign(secret.as_bytes(), ts, body.as_bytes()).unwrap();
    let mut r = client
        .post(format!("{base}/v1/transactions"))
        .header("Content-Type", "application/json")
        .header("X-Rtpd-Vendor", HMAC_VENDOR)
        .header("X-Rtpd-Timestamp", ts.to_string())
        .header("X-Rtpd-Signature", sig);
    if let Some(xff) = forwarded_for {
        r = r.header("X-Forwarded-For", xff);
    }
    r.body(body).send().await.unwrap().status().as_u16()
}

fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(ip))
        .build()
        .unwrap()
}

/// Issue 20, open finding 1, against the release binary with the default
/// limits (64 unverified slots): forged signed requests trickling from two
/// addresses, 40 each, took the whole unverified pool and a genuine HMAC
/// vendor from a third address got 503. Now each address holds at most a
/// quarter of the pool, so the vendor gets 202; and once it has verified,
/// its requests wait in the vendors' pool, so forgers from five addresses
/// filling the unverified pool do not reach it either; and a signer that has
/// not verified from its address yet gets in by eviction (it got 503 before).
#[tokio::test]
async fn forgers_from_a_few_addresses_cannot_starve_a_signing_vendor() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let keys = dir.path().join("vendor-keys");
    std::fs::write(&keys, format!("{HMAC_VENDOR}:hmac:{HMAC_SECRET}\n")).unwrap();
    let _serve = Proc(
        release_rtpd()
            .arg("serve")
            .env("RTPD_DATA_DIR", dir.path())
            .env("RTPD_VENDOR_KEYS_FILE", &keys)
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            )
            .env("RTPD_REQUEST_TIMEOUT_SECS", "60")
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;

    let mut forged = forged_signed_posts(&base, [127, 0, 0, 2].into(), 40);
    forged.extend(forged_signed_posts(&base, [127, 0, 0, 3].into(), 40));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vendor = client_from([127, 0, 0, 4]);
    let mut statuses = Vec::new();
    for i in 0..29 {
        statuses.push(signed_post(&vendor, &base, &format!("TWO-{i}")).await);
    }
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");

    // Three more forging addresses: 5 × 16 > 64, the unverified pool is full.
    for ip in 5..=7 {
        forged.extend(forged_signed_posts(&base, [127, 0, 0, ip].into(), 40));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut statuses = Vec::new();
    for i in 0..29 {
        statuses.push(signed_post(&vendor, &base, &format!("FIVE-{i}")).await);
    }
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    // A signer not vouched for yet, from a sixth address, meets the full
    // unverified pool (second review's finding 1: 503 on 14 of 14). The
    // oldest forged request of an address holding the most places gives
    // its place up, so the newcomer gets in (and, vouched for from then
    // on, its next requests wait in the vendors' pool).
    let newcomer = client_from([127, 0, 0, 8]);
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(signed_post(&newcomer, &base, &format!("NEW-{i}")).await);
    }
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    // Evicted forgers got 503 (not charged: an evicted request may be a
    // genuine signer's).
    let mut evicted = 0;
    for task in forged {
        if task.is_finished()
            && let Ok(Some((answer, _))) = task.await
        {
            evicted += usize::from(answer.starts_with("HTTP/1.1 503"));
        }
    }
    assert!(evicted >= 1, "no forged request gave its place up");
}

/// Sends `head`, then `body` after `delay`, and reads the answer's status.
fn late_body_request(
    address: &str,
    head: String,
    body: String,
    delay: Duration,
) -> tokio::task::JoinHandle<u16> {
    let address = address.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(delay).await;
        // The server may have answered already (429): the write may fail.
        let _ = stream.write_all(body.as_bytes()).await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        answer
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"))
    })
}

/// Issue 20, open finding 2: a signing vendor with 60 requests from one
/// address waiting for their bodies at once (each body sent 300 ms after
/// its headers) got 40 × 202 and 20 × 429, the per-address cap on
/// unverified requests. Once a signature from its address has verified,
/// its signed requests wait in the vendors' pool instead, without that cap.
#[tokio::test]
async fn a_vouched_signer_may_have_many_requests_waiting_for_their_bodies() {
    let app = spawn_app().await;
    assert_eq!(signed_post(&app.client, &app.address, "WARM-0").await, 202);
    let statuses = late_signed_posts(&app.address, "LATE", 60, "").await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
}

/// A genuine signed POST of `id` (`extra` is more header lines): its head
/// and its body.
fn genuine_signed_post(id: &str, extra: &str) -> (String, String) {
    use rtp_durability::auth::sign;
    let body = format!(r#"{{"transaction_id":"{id}"}}"#);
    let ts = now_unix();
    let sig = sign(HMAC_SECRET.as_bytes(), ts, body.as_bytes()).unwrap();
    let head = format!(
        "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Rtpd-Vendor: {HMAC_VENDOR}\r\nX-Rtpd-Timestamp: {ts}\r\n\
         X-Rtpd-Signature: {sig}\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    (head, body)
}

/// `n` genuine signed POSTs at once, each sending its body 300 ms after its
/// headers (`extra` is more header lines): their statuses.
async fn late_signed_posts(address: &str, prefix: &str, n: usize, extra: &str) -> Vec<u16> {
    let late: Vec<_> = (0..n)
        .map(|i| {
            let (head, body) = genuine_signed_post(&format!("{prefix}-{i}"), extra);
            late_body_request(address, head, body, Duration::from_millis(300))
        })
        .collect();
    let mut statuses = Vec::new();
    for task in late {
        statuses.push(task.await.unwrap());
    }
    statuses
}

/// Issue 20, open finding 3: a signed request whose signature verifies but
/// finds the vendors' pool full gets 503 — and was charged to its address's
/// rate as if forged, so past the burst (40) the genuine vendor got 429.
/// A verified signature is never charged.
#[tokio::test]
async fn a_verified_request_refused_for_a_full_vendor_pool_is_not_charged() {
    let app = spawn_app_with(AppOptions {
        configure: |s| s.max_in_flight = 4,
        ..Default::default()
    })
    .await;
    // Four API-key POSTs trickling their bodies hold the vendors' pool.
    let holders: Vec<_> = (0..4)
        .map(|_| {
            slow_request(
                &app.address,
                format!(
                    "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     X-Api-Key: {API_KEY}\r\nContent-Length: 100\r\n\r\n{{"
                ),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut statuses = Vec::new();
    for i in 0..60 {
        statuses.push(signed_post(&app.client, &app.address, &format!("FULL-{i}")).await);
    }
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    for task in holders {
        task.abort();
    }
}

/// A wrong HMAC secret: forged signatures.
const FORGED_SECRET: &str = "not-the-secret-0123456789";

/// Forged signed POSTs from `forwarded_for` (one a call, so a varying
/// address per call is possible) until one is refused with 429: how many
/// were answered 401 before it. Panics on any other status, or if 200
/// calls go by without a 429.
async fn forge_until_refused(
    app: &crate::support::TestApp,
    forwarded_for: &dyn Fn(usize) -> String,
) -> usize {
    for i in 0..200 {
        let xff = forwarded_for(i);
        match post_signed_with(
            &app.client,
            &app.address,
            &format!("F-{i}"),
            FORGED_SECRET,
            Some(&xff),
        )
        .await
        {
            401 => {}
            429 => return i,
            other => panic!("forged POST {i} from {xff}: {other}"),
        }
    }
    panic!("200 forged POSTs and none refused with 429");
}

/// Each slow request was answered 408: its body took too long.
async fn assert_timed_out(slow: Vec<tokio::task::JoinHandle<Option<(String, Duration)>>>) {
    for task in slow {
        let (answer, _) = task.await.unwrap().expect("no answer");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}

/// A POST with a wrong API key from `forwarded_for`: its status.
async fn bad_key_post(app: &crate::support::TestApp, forwarded_for: &str) -> u16 {
    app.client
        .post(format!("{}/v1/transactions", app.address))
        .header("X-Api-Key", "wrong")
        .header("X-Forwarded-For", forwarded_for)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

const FORGER: &str = "203.0.113.66";
const SIGNER: &str = "198.51.100.7";

/// Issue 20, second review finding 3: a forged signed request whose client
/// resets the connection mid-body was never charged to its address (the
/// charge ran after the handler's future, which actix drops then), so a
/// forger could fail without limit. Now the charge is made when the slot is
/// given back, however the request ends: after a few resets the forger's
/// address is over its rate (429), another address is not.
#[tokio::test]
async fn a_forger_that_resets_its_connections_is_charged() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.trusted_proxies = "127.0.0.1/32".parse().unwrap();
            s.unauthenticated_rate_per_sec = 1;
            s.unauthenticated_rate_burst = 3;
        },
        ..Default::default()
    })
    .await;
    let head = forged_signed_head(&format!("X-Forwarded-For: {FORGER}\r\n"));
    for _ in 0..6 {
        let mut s = TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.set_zero_linger().unwrap();
        drop(s); // RST: the server drops the request's future
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        bad_key_post(&app, FORGER).await,
        429,
        "the resets were charged to the forger's address"
    );
    assert_eq!(
        bad_key_post(&app, SIGNER).await,
        401,
        "another address is not"
    );
}

/// Issue 20, open finding 2: behind the Container Apps ingress every
/// caller had Envoy's address, so a forger behind it used up the genuine
/// signer's share of the unverified pool, its rate and its vouching (the
/// signer got 429 on 15 of 15). With the proxy (here the loopback peer) in
/// `RTPD_TRUSTED_PROXIES`, each is its `X-Forwarded-For` address.
#[tokio::test]
async fn behind_a_trusted_proxy_a_forger_does_not_use_up_the_signers_limits() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.trusted_proxies = "127.0.0.1/32".parse().unwrap();
            s.max_unverified_per_source = Some(4);
            s.unauthenticated_rate_per_sec = 1;
            s.unauthenticated_rate_burst = 5;
            // The trickled forgeries time out (408, charged) after this.
            s.request_timeout_secs = 4.0;
        },
        ..Default::default()
    })
    .await;
    let forged_head = forged_signed_head(&format!("X-Forwarded-For: {FORGER}\r\n"));
    let trickling: Vec<_> = (0..4)
        .map(|_| slow_request(&app.address, forged_head.clone()))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let forged = post_signed_with(
        &app.client,
        &app.address,
        "F-SHARE",
        FORGED_SECRET,
        Some(FORGER),
    )
    .await;
    assert_eq!(forged, 429, "the forger's share is full");
    let mut statuses = Vec::new();
    for i in 0..5 {
        statuses.push(
            post_signed_with(
                &app.client,
                &app.address,
                &format!("S-{i}"),
                HMAC_SECRET,
                Some(SIGNER),
            )
            .await,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 202),
        "beside a full share: {statuses:?}"
    );
    assert_timed_out(trickling).await;

    // The forger's failures are charged to its address, not the signer's,
    // and do not end the signer's vouching.
    let failed = forge_until_refused(&app, &|_| FORGER.to_owned()).await;
    assert!(
        failed >= 1,
        "no forged POST was answered (and charged) before the 429"
    );
    assert_eq!(
        bad_key_post(&app, FORGER).await,
        429,
        "the forger is over its rate"
    );
    assert_eq!(
        bad_key_post(&app, SIGNER).await,
        401,
        "the signer's rate is its own"
    );
    let mut statuses = Vec::new();
    for i in 5..10 {
        statuses.push(
            post_signed_with(
                &app.client,
                &app.address,
                &format!("S-{i}"),
                HMAC_SECRET,
                Some(SIGNER),
            )
            .await,
        );
    }
    assert!(
        statuses.iter().all(|s| *s == 202),
        "after the forger's failures: {statuses:?}"
    );
    // Vouched for, the signer may have more requests waiting for their
    // bodies than the share (4) of an address not vouched for.
    let extra = format!("X-Forwarded-For: {SIGNER}\r\n");
    let statuses = late_signed_posts(&app.address, "LATE", 8, &extra).await;
    assert!(
        statuses.iter().all(|s| *s == 202),
        "vouched for: {statuses:?}"
    );
    // A peer outside the trusted list sending X-Forwarded-For is counted
    // (the proxy may have moved out of the list), and not believed.
    let outside = client_from([127, 0, 0, 3]);
    let r = outside
        .post(format!("{}/v1/transactions", app.address))
        .header("X-Forwarded-For", SIGNER)
        .header("Authorization", "Bearer wrong")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let metrics = app.prometheus().await;
    assert!(
        metrics.contains("rtpd_forwarded_for_ignored_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("forwarded"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Without `RTPD_TRUSTED_PROXIES` no `X-Forwarded-For` is believed: a
/// forger naming another address in each request still meets its own
/// address's share and rate, and its records carry the TCP peer.
#[tokio::test]
async fn without_trusted_proxies_x_forwarded_for_changes_nothing() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_unverified_per_source = Some(4);
            s.unauthenticated_rate_per_sec = 1;
            s.unauthenticated_rate_burst = 5;
            // The trickled forgeries time out (408, charged) after this.
            s.request_timeout_secs = 4.0;
        },
        ..Default::default()
    })
    .await;
    assert_eq!(bad_key_post(&app, SIGNER).await, 401);
    let (calls, _) = rejected_calls(&app).await;
    let addrs: Vec<_> = calls.iter().map(|c| c.remote_addr.as_deref()).collect();
    assert_eq!(addrs, [Some("127.0.0.1")]);

    let trickling: Vec<_> = (0..4)
        .map(|i| {
            let xff = format!("X-Forwarded-For: 203.0.113.{i}\r\n");
            slow_request(&app.address, forged_signed_head(&xff))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for xff in ["203.0.113.99", SIGNER] {
        let forged = post_signed_with(
            &app.client,
            &app.address,
            "F-SHARE",
            FORGED_SECRET,
            Some(xff),
        )
        .await;
        assert_eq!(
            forged, 429,
            "X-Forwarded-For: {xff} escaped the peer's full share"
        );
    }
    assert_timed_out(trickling).await;
    // The burst is 5: one spent above, four on the trickled forgeries.
    let failed = forge_until_refused(&app, &|i| format!("203.0.113.{}", 100 + i)).await;
    assert!(
        failed <= 6,
        "{failed} forged POSTs from varying X-Forwarded-For before a 429"
    );
}

/// A trusted proxy's chain "evil, real, proxy": the client wrote "evil",
/// the trusted proxy appended "real"; "real" is the client, in the WAL
/// record of an accepted POST and in the record of a refused one.
#[tokio::test]
async fn a_trusted_proxy_chain_names_the_rightmost_address_not_a_proxy() {
    let app = spawn_app_with(AppOptions {
        configure: |s| s.trusted_proxies = "127.0.0.1, 10.0.0.0/8".parse().unwrap(),
        ..Default::default()
    })
    .await;
    let chain = format!("{FORGER}, {SIGNER}, 10.1.2.3");
    let r = app
        .client
        .post(format!("{}/v1/transactions", app.address))
        .header("X-Api-Key", API_KEY)
        .header("X-Forwarded-For", &chain)
        .header("Content-Type", "application/json")
        .body(r#"{"transaction_id":"CHAIN-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let receipt = json(r).await;
    let rec = load_record(
        &app.services.wal,
        &receipt["wal"]["ref"].as_str().unwrap().parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rec.source.remote_addr.as_deref(), Some(SIGNER));

    assert_eq!(bad_key_post(&app, &chain).await, 401);
    let (calls, _) = rejected_calls(&app).await;
    let addrs: Vec<_> = calls.iter().map(|c| c.remote_addr.as_deref()).collect();
    assert_eq!(addrs, [Some(SIGNER)]);
}

/// Issue 20, D1, against the release binary: forged but well-formed
/// signature headers (both `X-Rtpd-*` and `webhook-*`) with trickled bodies.
/// They wait in the unauthenticated pool, not the vendors' one, and at most
/// `RTPD_MAX_UNVERIFIED_PER_SOURCE` at once from one address; API-key,
/// HMAC and Standard Webhooks vendors still get 202, the signing ones well
/// past that burst from their own single address.
#[tokio::test]
async fn forged_signature_headers_wait_in_the_unverified_pool_and_vendor_posts_get_202() {
    use rtp_durability::auth::{hash_secret, sign, sign_webhook};
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let keys = dir.path().join("vendor-keys");
    std::fs::write(
        &keys,
        format!(
            "acme:sha256:{}\n{HMAC_VENDOR}:hmac:{HMAC_SECRET}\nhooli:whsec:{HOOLI_SECRET}\n",
            hash_secret(API_KEY)
        ),
    )
    .unwrap();
    let _serve = Proc(
        release_rtpd()
            .arg("serve")
            .env("RTPD_DATA_DIR", dir.path())
            .env("RTPD_VENDOR_KEYS_FILE", &keys)
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            )
            .env("RTPD_MAX_IN_FLIGHT", "8")
            .env("RTPD_REQUEST_TIMEOUT_SECS", "60")
            .env("RTPD_MAX_UNVERIFIED_PER_SOURCE", "10")
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;

    // 12 forged requests from 127.0.0.2, half in each form: more than the
    // 8 vendor slots, 2 more than the per-address limit of 10.
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let ts = now_unix();
    let forged: Vec<_> = (0..12)
        .map(|i| {
            let signature = if i % 2 == 0 {
                format!(
                    "X-Rtpd-Vendor: {HMAC_VENDOR}\r\nX-Rtpd-Timestamp: {ts}\r\n\
                     X-Rtpd-Signature: v1={}\r\n",
                    "ab".repeat(32)
                )
            } else {
                format!(
                    "webhook-id: msg_forged_{i}\r\nwebhook-timestamp: {ts}\r\n\
                     webhook-signature: v1,{}\r\n",
                    "A".repeat(43) + "="
                )
            };
            slow_request_from(
                &base,
                Some(attacker),
                format!(
                    "POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     {signature}Content-Length: 100\r\n\r\n{{"
                ),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let client = reqwest::Client::new();
    let post = |headers: Vec<(String, String)>, body: String| {
        let mut r = client
            .post(format!("{base}/v1/transactions"))
            .header("Content-Type", "application/json")
            .body(body);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };
    for i in 0..5 {
        let body = format!(r#"{{"transaction_id":"KEY-{i}"}}"#);
        let r = post(vec![("X-Api-Key".into(), API_KEY.into())], body)
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "API-key vendor POST {i}");
    }
    // More signed POSTs from one address than the per-address limit allows
    // unauthenticated callers: a verified signature is not limited by it.
    for i in 0..15 {
        let body = format!(r#"{{"transaction_id":"HMAC-{i}"}}"#);
        let ts = now_unix();
        let sig = sign(HMAC_SECRET.as_bytes(), ts, body.as_bytes()).unwrap();
        let r = post(
            vec![
                ("X-Rtpd-Vendor".into(), HMAC_VENDOR.into()),
                ("X-Rtpd-Timestamp".into(), ts.to_string()),
                ("X-Rtpd-Signature".into(), sig),
            ],
            body,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 202, "HMAC vendor POST {i}");
    }
    for i in 0..15 {
        let body = format!(r#"{{"transaction_id":"HOOK-{i}"}}"#);
        let ts = now_unix();
        let id = format!("msg_{i}");
        let sig = sign_webhook(HOOLI_SECRET, &id, ts, body.as_bytes()).unwrap();
        let r = post(
            vec![
                ("webhook-id".into(), id),
                ("webhook-timestamp".into(), ts.to_string()),
                ("webhook-signature".into(), sig),
            ],
            body,
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 202, "Standard Webhooks vendor POST {i}");
    }
    // The forged requests: 10 still waiting for their bodies, 2 refused at
    // once by the per-address limit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut refused = 0;
    for task in forged {
        if task.is_finished() {
            let (answer, took) = task.await.unwrap().expect("closed without an answer");
            assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
            assert!(took < Duration::from_secs(2), "{took:?}: {answer}");
            refused += 1;
        } else {
            task.abort();
        }
    }
    assert_eq!(refused, 2, "forged requests over the per-address limit");
}

#[tokio::test]
async fn replay_bodies_are_read_only_after_authentication_and_refused_as_json() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_body_bytes = 1024;
            s.request_timeout_secs = 1.0;
        },
        ..Default::default()
    })
    .await;
    for path in ["/replay/A-1", "/v1/transactions/A-1/replay"] {
        // An operator whose body trickles in: the one body reader's read
        // timeout answers 408 with a JSON body, as it does on ingest.
        let slow = slow_request(
            &app.address,
            format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            ),
        );
        let (answer, took) = slow
            .await
            .unwrap()
            .expect("an answer to the slow operator body");
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{path}: {answer}"
        );
        assert!(
            took < Duration::from_secs(5),
            "{path}: answered after {took:?}"
        );
        let url = format!("{}{path}", app.address);
        // Anonymous: 401 before the (invalid) body is parsed.
        let r = app
            .client
            .post(&url)
            .header("Content-Type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "unauthenticated", "anonymous replay, bad body").await;
        // A vendor: 403, body unread.
        let r = app
            .client
            .post(&url)
            .header("X-Api-Key", API_KEY)
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_error(r, 403, "forbidden", "vendor replay").await;
        // An operator with too large a body: the one body reader's JSON 413.
        let big = format!(r#"{{"reason":"{}"}}"#, "x".repeat(2000));
        let r = app
            .client
            .post(&url)
            .bearer_auth(ADMIN_TOKEN)
            .header("Content-Type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_error(r, 413, "payload_too_large", "operator, big body").await;
        let r = app
            .client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "unauthenticated", "anonymous, big body").await;
    }
}

#[tokio::test]
async fn probes_answer_while_the_vendor_pool_is_full() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight = 1;
            s.request_timeout_secs = 30.0;
        },
        ..Default::default()
    })
    .await;
    // A vendor's slow body holds the only vendor slot.
    let hold = || {
        slow_request(
            &app.address,
            format!(
                "POST /v1/transactions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                 X-Api-Key: {API_KEY}\r\nContent-Length: 100\r\n\r\n{{"
            ),
        )
    };
    let mut holder = hold();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A probe can take the slot just as the holder arrives (the holder
        // then gets the 503): start it again.
        if holder.is_finished() {
            holder = hold();
        }
        if app.get_tx("P-1").await.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "the vendor pool never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The probes have their own pool.
    for path in ["/healthz", "/readyz"] {
        let r = app
            .client
            .get(format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path} while vendors are saturated");
    }
    let r = app.admin_get("/metrics").await;
    assert_eq!(r.status(), 200);
    holder.abort();
}

/// Issue 20, D2: a flood of `/readyz` while a dependency hangs (Redis
/// stopped: each check waits out its timeout) neither fills the probe pool
/// so that `/healthz` answers 503, nor multiplies the dependency checks.
#[tokio::test]
async fn a_readyz_flood_leaves_healthz_200_and_checks_dependencies_once() {
    let redis = OwnRedis::start();
    let app = spawn_app_with(AppOptions {
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    let get = |path: &'static str| {
        app.client
            .get(format!("{}{path}", app.address))
            .timeout(Duration::from_secs(20))
            .send()
    };
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let pings = || {
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0u64, |n| n.parse().unwrap())
    };
    let before = pings();
    // Past the cache's second: the flood finds the result stale.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    redis.signal("STOP");
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let r = get("/readyz");
            tokio::spawn(async move { r.await.map(|r| r.status().as_u16()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let r = get("/healthz").await.unwrap();
        assert_eq!(r.status(), 200, "/healthz {i} during the /readyz flood");
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for f in flood {
        *statuses.entry(f.await.unwrap().unwrap()).or_default() += 1;
    }
    redis.signal("CONT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let checks = pings() - before;
    eprintln!("40 concurrent /readyz: {statuses:?}, {checks} Redis PINGs");
    assert_eq!(statuses.get(&200), Some(&40), "{statuses:?}");
    assert!(checks <= 2, "{checks} ledger checks for 40 /readyz");
}

#[tokio::test]
async fn unauthenticated_callers_are_rate_limited_per_source_address() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.unauthenticated_rate_per_sec = 1;
            s.unauthenticated_rate_burst = 3;
        },
        ..Default::default()
    })
    .await;
    let bad = |i: usize| {
        app.client
            .post(format!("{}/v1/transactions", app.address))
            .header("X-Api-Key", "wrong")
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"transaction_id":"U-{i}"}}"#))
            .send()
    };
    for i in 0..3 {
        assert_error(
            bad(i).await.unwrap(),
            401,
            "unauthenticated",
            "within burst",
        )
        .await;
    }
    let r = bad(3).await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    assert_error(r, 429, "rate_limited", "over the per-source limit").await;
    // Callers with a credential are not limited by their address.
    assert_eq!(app.get_tx("U-1").await.status(), 404);
    assert_eq!(
        app.post_json(&json!({"transaction_id": "U-OK"}))
            .await
            .status(),
        202
    );
    assert_eq!(app.admin_get("/v1/transactions").await.status(), 200);
}

#[tokio::test]
async fn a_flood_of_bad_keys_writes_a_bounded_number_of_rejected_records() {
    let app = spawn_app_with(AppOptions {
        configure: |s| s.unauthenticated_rate_per_sec = 0,
        ..Default::default()
    })
    .await;
    let flood = 300;
    for i in 0..flood {
        let r = app
            .client
            .post(format!("{}/v1/transactions", app.address))
            .header("X-Api-Key", format!("wrong-{i}"))
            .header("Content-Type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let now = chrono::Utc::now();
    let log = &app.services.rejected;
    let mut records = 0;
    let mut segments = 0;
    for seg in log
        .segments(
            now - chrono::Duration::hours(1),
            now + chrono::Duration::hours(1),
        )
        .await
        .unwrap()
    {
        segments += 1;
        records += log.read_segment(&seg.key).await.unwrap().len();
    }
    eprintln!("{flood} refused calls: {records} records in {segments} segments");
    assert!(records >= 1, "nothing recorded");
    assert!(
        records <= rtp_durability::api::rejected::PER_SOURCE_BURST as usize + 1,
        "{records} records for {flood} calls from one source"
    );
    let text = app.prometheus().await;
    let unrecorded: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rtpd_rejected_calls_unrecorded_total "))
        .unwrap_or_else(|| panic!("no unrecorded counter in {text}"))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(unrecorded as usize + records, flood);
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn any_content_encoding_but_identity_is_refused_with_415_on_every_route() {
    let app = spawn_app().await;
    let post = |body: Vec<u8>, encoding: &str| {
        app.client
            .post(format!("{}/v1/transactions", app.address))
            .header("X-Api-Key", API_KEY)
            .header("Content-Type", "application/json")
            .header("Content-Encoding", encoding)
            .body(body)
            .send()
    };
    let real = gzip(br#"{"transaction_id":"GZ-1"}"#);
    let r = post(real, "gzip").await.unwrap();
    assert_error(r, 415, "unsupported_content_encoding", "real gzip").await;
    let r = post(br#"{"transaction_id":"GZ-2"}"#.to_vec(), "gzip")
        .await
        .unwrap();
    assert_error(
        r,
        415,
        "unsupported_content_encoding",
        "plain body labelled gzip",
    )
    .await;
    let r = post(br#"{"transaction_id":"GZ-3"}"#.to_vec(), "br")
        .await
        .unwrap();
    assert_error(r, 415, "unsupported_content_encoding", "br").await;
    for id in ["GZ-1", "GZ-2", "GZ-3"] {
        assert!(app.find(id).await.is_none(), "{id}");
    }
    // Replay and GET routes: the same.
    let r = app
        .client
        .post(format!("{}/replay/GZ-1", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .header("Content-Encoding", "gzip")
        .body(gzip(b"{}"))
        .send()
        .await
        .unwrap();
    assert_error(r, 415, "unsupported_content_encoding", "replay").await;
    let r = app
        .client
        .get(format!("{}/v1/transactions", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .header("Content-Encoding", "deflate")
        .send()
        .await
        .unwrap();
    assert_error(r, 415, "unsupported_content_encoding", "list").await;
    // `identity` is no encoding.
    let r = post(br#"{"transaction_id":"GZ-4"}"#.to_vec(), "identity")
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test]
async fn head_is_answered_on_every_get_route() {
    let app = spawn_app().await;
    for (path, auth, status) in [
        ("/healthz", None, 200),
        ("/readyz", None, 200),
        ("/openapi.json", None, 200),
        ("/metrics", Some(ADMIN_TOKEN), 200),
        ("/status", Some(ADMIN_TOKEN), 200),
        ("/transactions", Some(ADMIN_TOKEN), 200),
        ("/v1/transactions", Some(ADMIN_TOKEN), 200),
        ("/v1/transactions/NOPE", Some(ADMIN_TOKEN), 404),
        ("/v1/transactions", None, 401),
    ] {
        let mut req = app.client.head(format!("{}{path}", app.address));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "HEAD {path}");
        assert!(r.headers().contains_key("content-type"), "HEAD {path}");
        assert!(
            r.bytes().await.unwrap().is_empty(),
            "HEAD {path} has a body"
        );
    }
    // HEAD is not a way around POST-only routes.
    let r = app
        .client
        .head(format!("{}/replay/X", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn options_answers_204_with_allow_and_no_cors() {
    let app = spawn_app().await;
    for (path, allow) in [
        ("/v1/transactions", "POST, HEAD, GET, OPTIONS"),
        ("/v1/transactions/X/replay", "POST, OPTIONS"),
        ("/healthz", "HEAD, GET, OPTIONS"),
    ] {
        let r = app
            .client
            .request(reqwest::Method::OPTIONS, format!("{}{path}", app.address))
            .header("Origin", "https://evil.example")
            .header("Access-Control-Request-Method", "POST")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204, "OPTIONS {path}");
        assert_eq!(r.headers()["allow"], allow, "OPTIONS {path}");
        assert!(
            !r.headers()
                .keys()
                .any(|k| k.as_str().starts_with("access-control-")),
            "OPTIONS {path} answered CORS headers"
        );
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = spawn_app().await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = app
            .client
            .get(format!("{}/v1/transactions", app.address))
            .header("Authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    let r = app
        .client
        .get(format!("{}/v1/transactions", app.address))
        .header("Authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_error(r, 401, "unauthenticated", "Basic is not Bearer").await;
}

#[tokio::test]
async fn duplicate_or_mixed_credentials_are_refused() {
    let app = spawn_app().await;
    let url = format!("{}/v1/transactions", app.address);
    // Two API keys, the first valid: refused, not served by the first.
    let r = app
        .client
        .post(&url)
        .header("Content-Type", "application/json")
        .header("X-Api-Key", API_KEY)
        .header("X-Api-Key", "other")
        .body(r#"{"transaction_id":"DUP-1"}"#)
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "duplicate_credentials", "two X-Api-Key").await;
    assert!(app.find("DUP-1").await.is_none());
    let r = app
        .client
        .get(&url)
        .header("Authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("Authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "duplicate_credentials", "two Authorization").await;
    // A vendor key and an admin token together: not served as admin.
    let r = app
        .client
        .get(&url)
        .header("X-Api-Key", API_KEY)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        400,
        "ambiguous_credentials",
        "key + bearer on an admin route",
    )
    .await;
    let r = app
        .client
        .post(&url)
        .header("Content-Type", "application/json")
        .header("X-Api-Key", API_KEY)
        .header("X-Rtpd-Vendor", HMAC_VENDOR)
        .header("X-Rtpd-Timestamp", now_unix().to_string())
        .header("X-Rtpd-Signature", format!("v1={}", "0".repeat(64)))
        .body(r#"{"transaction_id":"DUP-2"}"#)
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "ambiguous_credentials", "key + signature").await;
    assert!(app.find("DUP-2").await.is_none());
}

#[tokio::test]
async fn a_forced_replay_needs_a_reason() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_json(&json!({"transaction_id": "WHY-1"}))
            .await
            .status(),
        202
    );
    app.drain_until_terminal(&["WHY-1"]).await;
    for path in ["/replay/WHY-1", "/v1/transactions/WHY-1/replay"] {
        for body in [
            json!({"force": true}),
            json!({"force": true, "reason": "  "}),
        ] {
            let r = app.admin_post(path, Some(body.clone())).await;
            assert_error(r, 400, "reason_required", &format!("{path} {body}")).await;
        }
    }
    let out = rtpd()
        .args(["replay", "WHY-1", "--force"])
        .env("RTPD_DATA_DIR", app.data_dir())
        .output()
        .unwrap();
    // A usage error: exit status 2, as clap's.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--reason"), "{err}");
    // Issue 12: force names the state the operator saw. Without it, a
    // forced replay reset whatever success the replayer found, also one that
    // came after the operator looked.
    for path in ["/replay/WHY-1", "/v1/transactions/WHY-1/replay"] {
        let body = json!({"force": true, "reason": "downstream lost it"});
        let r = app.admin_post(path, Some(body.clone())).await;
        let b = assert_error(r, 400, "expected_state_required", path).await;
        assert!(
            b["message"].as_str().unwrap().contains("expected_state"),
            "{b}"
        );
    }
    for args in [
        &[
            "replay",
            "WHY-1",
            "--force",
            "--reason",
            "downstream lost it",
        ][..],
        &["dlq", "replay", "--force", "--reason", "downstream lost it"][..],
        &["dlq", "replay", "--force", "--if-state", "success"][..],
    ] {
        let out = rtpd()
            .args(args)
            .env("RTPD_DATA_DIR", app.data_dir())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("--if-state") || err.contains("--reason"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        app.record("WHY-1").await.status,
        rtp_durability::transaction::State::Success
    );
    // Issue 12: the operator says which state they saw; a forced replay of
    // what was `failed` does not reset the `success` that came since.
    for path in ["/replay/WHY-1", "/v1/transactions/WHY-1/replay"] {
        let r = app
            .admin_post(
                path,
                Some(json!({"force": true, "reason": "it failed", "expected_state": "failed"})),
            )
            .await;
        let b = assert_error(r, 409, "invalid_state", path).await;
        assert!(b["message"].as_str().unwrap().contains("not failed"), "{b}");
    }
    let out = rtpd()
        .args([
            "replay",
            "WHY-1",
            "--force",
            "--reason",
            "it failed",
            "--if-state",
            "failed",
            "--vendor",
            "acme",
        ])
        .env("RTPD_DATA_DIR", app.data_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("acme/WHY-1: refused (success now, not failed as expected (--if-state"),
        "the CLI's forced replay with a stale --if-state: {said}"
    );
    let r = app
        .admin_post(
            "/replay/WHY-1",
            Some(
                json!({"force": true, "reason": "downstream lost it", "expected_state": "success"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 202);
    let _ = json(r).await;
}

#[tokio::test]
async fn operator_ranges_stop_at_the_wal_retention_and_wal_cat_checks_lengths() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_json(&json!({"transaction_id": "RANGE-1"}))
            .await
            .status(),
        202
    );
    let run = |args: &[&str]| {
        let started = Instant::now();
        let out = rtpd()
            .args(args)
            .env("RTPD_DATA_DIR", app.data_dir())
            .env("RTPD_WAL_RETENTION_DAYS", "30")
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    for args in [
        &["replay", "--from", "99999999h", "--dry-run"][..],
        &["wal", "ls", "--from", "99999999h"],
        &["wal", "ls", "--from", "31d"],
        &["wal", "cat", "NOPE", "--from", "99999999h"],
    ] {
        let (out, took) = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("RTPD_WAL_RETENTION_DAYS"), "{args:?}: {err}");
        eprintln!("{args:?}: refused in {took:?}");
    }
    let (ok, _) = run(&["wal", "ls", "--from", "29d"]);
    assert!(ok.status.success());

    let wal_ref = app.record("RANGE-1").await.wal_ref.to_string();
    let segment = wal_ref.split('#').next().unwrap();
    for len in ["99999999999", "18446744073709551615"] {
        let target = format!("{segment}#0+{len}");
        let (out, _) = run(&["wal", "cat", &target]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{target}: {err}");
        assert_eq!(err.lines().count(), 1, "{target}: {err}");
        assert!(err.contains("past the end"), "{target}: {err}");
    }
    let (out, _) = run(&["wal", "cat", &format!("{segment}#18446744073709551615+1")]);
    assert_eq!(out.status.code(), Some(1));
    let (out, _) = run(&["wal", "cat", &wal_ref]);
    assert!(out.status.success());
}

#[cfg(unix)]
#[tokio::test]
async fn rtpd_dev_keeps_its_credentials_readable_by_the_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A file an earlier version left world-readable is tightened too.
    let old = dir.path().join("dev-credentials.json");
    std::fs::write(
        &old,
        r#"{"vendor":"dev-vendor","api_key":"rtpd_vk_x","admin_token":"rtpd_adm_x","hmac_vendor":"","hmac_secret":""}"#,
    )
    .unwrap();
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _p = crate::support::process::start_dev_pipeline(dir.path(), &[]).await;
    for name in ["dev-credentials.json", "dev-vendor-keys"] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
    }
}

#[tokio::test]
async fn malformed_requests_are_counted_and_not_logged_as_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_mock, mock_port) = start_mock(&[]).await;
    let api_port = free_port();
    let log = dir.path().join("stderr.log");
    let _dev = Proc(
        rtpd()
            .args(["dev", "--no-mock"])
            .env("RTPD_DATA_DIR", dir.path())
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{api_port}"))
            .env(
                "RTPD_DOWNSTREAM_URL",
                format!("http://127.0.0.1:{mock_port}/process"),
            )
            .env("RTPD_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    let raw = |bytes: &'static [u8]| async move {
        let mut s = TcpStream::connect(("127.0.0.1", api_port)).await.unwrap();
        let _ = s.write_all(bytes).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let answers = [
        raw(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await,
        raw(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n").await,
        raw(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: \x01\x02\r\n\r\n").await,
        raw(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n").await,
        {
            let long: &'static [u8] = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70 * 1024))
                .into_bytes()
                .leak();
            raw(long).await
        },
    ];
    eprintln!("{answers:#?}");
    for (i, a) in answers.iter().enumerate() {
        assert!(
            a.is_empty()
                || a.starts_with("HTTP/1.1 400")
                || a.starts_with("HTTP/1.1 431")
                || a.starts_with("HTTP/1.1 414"),
            "case {i}: a malformed request was answered {a:?}"
        );
    }
    let creds: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("dev-credentials.json")).unwrap(),
    )
    .unwrap();
    let metrics = crate::support::prometheus_at(
        &reqwest::Client::new(),
        &base,
        creds["admin_token"].as_str(),
    )
    .await;
    let counted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rtpd_http_protocol_errors_total "))
        .unwrap_or_else(|| panic!("no protocol error counter: {metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(counted >= 1, "{metrics}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.lines().any(|l| l.contains("ERROR")),
        "a client's malformed request wrote an ERROR line:\n{text}"
    );
}

/// Signed GET of one transaction as the signing vendor.
async fn signed_get(app: &crate::support::TestApp, path: &str) -> reqwest::Response {
    let ts = now_unix();
    app.client
        .get(format!("{}{path}", app.address))
        .header("X-Rtpd-Vendor", HMAC_VENDOR)
        .header("X-Rtpd-Timestamp", ts.to_string())
        .header(
            "X-Rtpd-Signature",
            rtp_durability::auth::sign(
                crate::support::HMAC_SECRET.as_bytes(),
                ts,
                format!("GET {path}").as_bytes(),
            )
            .unwrap(),
        )
        .send()
        .await
        .unwrap()
}

/// Issue 20 item 2 through the dead-letter queue: `rtpd dlq` names a
/// vendor's transaction by its key (`acme/DL-1`), and a bare id that two
/// vendors share is refused with both keys named. Before, the given id was
/// compared with the message's key, so `rtpd dlq replay DL-1` selected
/// nothing and exited 0 whenever auth was on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_commands_name_a_vendors_transaction_by_its_key() {
    let app = spawn_app().await;
    let theirs = r#"{"transaction_id":"DL-1","amount":"2.00","_mock":{"script":["400","ok"]}}"#;
    assert_eq!(app.post_signed(theirs, now_unix()).await.status(), 202);
    let ours =
        json!({"transaction_id": "DL-1", "amount": "1.00", "_mock": {"script": ["400", "ok"]}});
    assert_eq!(app.post_json(&ours).await.status(), 202);
    let theirs_key = format!("{HMAC_VENDOR}/DL-1");
    app.drain_until_terminal(&["acme/DL-1", &theirs_key]).await;
    assert_eq!(app.state_of("acme/DL-1").await, State::DeadLetter);
    assert_eq!(app.state_of(&theirs_key).await, State::DeadLetter);
    let dlq = |args: &[&str]| {
        rtpd()
            .arg("dlq")
            .args(args)
            .env("RTPD_DATA_DIR", app.data_dir())
            // A replay waits out the window of a call that may still run
            // (lock + downstream timeout): short here.
            .env("RTPD_LOCK_DURATION_SECS", "1")
            .env("RTPD_DOWNSTREAM_TIMEOUT_SECS", "1")
            .output()
            .unwrap()
    };

    for args in [
        &["replay", "DL-1", "--reason", "downstream fixed"][..],
        &["purge", "DL-1", "--yes", "--reason", "tidy"][..],
    ] {
        let out = dlq(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("acme/DL-1")
                && err.contains(&theirs_key)
                && err.contains("give the key or the SEQ"),
            "{args:?}: {err}"
        );
    }
    let out = dlq(&["show", "acme/DL-1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"acme/DL-1\""));

    let out = dlq(&["replay", "acme/DL-1", "--reason", "downstream fixed"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("acme/DL-1: replayed"), "{said}");
    assert!(said.contains("1 dead-lettered messages removed"), "{said}");
    app.drain_until_terminal(&["acme/DL-1"]).await;
    assert_eq!(app.state_of("acme/DL-1").await, State::Success);
    assert_eq!(app.state_of(&theirs_key).await, State::DeadLetter);

    // A name that matches no dead letter is an error, not a quiet "0".
    for args in [
        &["replay", "DL-1X", "--reason", "typo"][..],
        &["replay", "DL-1X", "--dry-run"][..],
        &[
            "purge",
            "acme/DL-1",
            "--yes",
            "--reason",
            "replayed already",
        ][..],
        &["purge", "999999", "--yes"][..],
    ] {
        let out = dlq(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no dead-lettered message matches"),
            "{args:?}: {err}"
        );
    }
    // Now the bare id names one vendor's dead letter only; the SEQ that
    // `rtpd dlq ls` prints names it too.
    let out = dlq(&["replay", "DL-1", "--dry-run"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{theirs_key}: would replay")),
        "{out:?}"
    );
    let ls = String::from_utf8_lossy(&dlq(&["ls"]).stdout).into_owned();
    let seq = ls
        .lines()
        .find(|l| l.split('\t').nth(1) == Some(theirs_key.as_str()))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("{theirs_key} not listed: {ls}"))
        .to_owned();
    // A number that is one message's SEQ and another transaction's id names
    // both: refused (it picked both and purged them).
    let numeric = json!({"transaction_id": seq, "amount": "3.00", "_mock": {"script": ["400"]}});
    assert_eq!(app.post_json(&numeric).await.status(), 202);
    let numeric_key = format!("acme/{seq}");
    app.drain_until_terminal(&[&numeric_key]).await;
    assert_eq!(app.state_of(&numeric_key).await, State::DeadLetter);
    let out = dlq(&["purge", &seq, "--yes", "--reason", "tidy"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("names more than one")
            && err.contains(&numeric_key)
            && err.contains(&theirs_key),
        "{err}"
    );
    for key in [&theirs_key, &numeric_key] {
        let out = dlq(&["purge", key, "--yes", "--reason", "tidy"]);
        assert!(out.status.success(), "{out:?}");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.contains("1 dead-lettered messages purged"),
            "{key}: {said}"
        );
    }
    assert!(String::from_utf8_lossy(&dlq(&["ls"]).stdout).contains("0 dead-lettered messages"));
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"]["acme/DL-1"]["calls"], 2, "{calls}");
    assert_eq!(calls["by_key"][theirs_key.as_str()]["calls"], 1, "{calls}");
}

#[tokio::test]
async fn two_vendors_may_send_the_same_transaction_id() {
    two_vendors_share_an_id(spawn_app().await).await;
}

/// The same on the Redis ledger: its keys carry the vendor too.
#[tokio::test]
async fn two_vendors_may_send_the_same_transaction_id_redis() {
    two_vendors_share_an_id(
        spawn_app_with(AppOptions {
            redis_url: Some(crate::support::redis_url()),
            ..Default::default()
        })
        .await,
    )
    .await;
}

async fn two_vendors_share_an_id(app: crate::support::TestApp) {
    // The signing vendor takes the id first.
    let theirs = r#"{"transaction_id":"T-1","amount":"2.00"}"#;
    let r = app.post_signed(theirs, now_unix()).await;
    assert_eq!(r.status(), 202);
    let their_receipt = json(r).await;
    // The other vendor's payment with the same id is its own transaction,
    // and nothing of the first one shows.
    let ours = json!({"transaction_id": "T-1", "amount": "1.00"});
    let r = app.post_json(&ours).await;
    assert_eq!(r.status(), 202);
    let receipt = json(r).await;
    assert_eq!(receipt["transaction_id"], "T-1");
    assert_ne!(receipt["wal"]["ref"], their_receipt["wal"]["ref"]);
    assert_ne!(receipt["wal"]["sha256"], their_receipt["wal"]["sha256"]);
    let r = app.post_json(&ours).await;
    assert_eq!(r.status(), 200);
    let again = json(r).await;
    assert_eq!(again["wal"], receipt["wal"], "our own receipt");
    let r = app
        .post_json(&json!({"transaction_id": "T-1", "amount": "9.00"}))
        .await;
    let conflict = assert_error(r, 409, "conflict", "our own conflict").await;
    assert_eq!(conflict["transaction_id"], "T-1");

    let mine = json(app.get_tx("T-1").await).await;
    assert_eq!(mine["vendor"], "acme");
    assert_eq!(mine["transaction_id"], "T-1");
    assert_eq!(mine["sha256"], receipt["wal"]["sha256"]);
    let r = signed_get(&app, "/v1/transactions/T-1").await;
    assert_eq!(r.status(), 200);
    let other = json(r).await;
    assert_eq!(other["vendor"], HMAC_VENDOR);
    assert_eq!(other["sha256"], their_receipt["wal"]["sha256"]);

    // Operators name the vendor when two share an id.
    let r = app.admin_get("/v1/transactions/T-1").await;
    assert_error(r, 400, "ambiguous_transaction_id", "two vendors' T-1").await;
    let r = app.admin_get("/v1/transactions/T-1?vendor=acme").await;
    assert_eq!(json(r).await["sha256"], receipt["wal"]["sha256"]);
    let r = app
        .admin_get(&format!("/v1/transactions/T-1?vendor={HMAC_VENDOR}"))
        .await;
    assert_eq!(json(r).await["vendor"], HMAC_VENDOR);
    let list = json(app.admin_get("/v1/transactions").await).await;
    let mut vendors: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["transaction_id"] == "T-1")
        .map(|i| i["vendor"].as_str().unwrap())
        .collect();
    vendors.sort();
    assert_eq!(vendors, ["acme", HMAC_VENDOR]);

    // Two transactions downstream: one call each, under keys that differ.
    app.drain_until_terminal(&["acme/T-1", "globex/T-1"]).await;
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"]["acme/T-1"]["calls"], 1, "{calls}");
    assert_eq!(calls["by_key"]["globex/T-1"]["calls"], 1, "{calls}");
    let r = app
        .admin_post(
            &format!("/v1/transactions/T-1/replay?vendor={HMAC_VENDOR}"),
            Some(json!({"force": true, "reason": "vendor asked", "expected_state": "success"})),
        )
        .await;
    assert_eq!(r.status(), 202);
    let replayed = json(r).await;
    assert_eq!(replayed["transaction_id"], "T-1");
    assert_eq!(replayed["vendor"], HMAC_VENDOR);
    app.drain_until_terminal(&["globex/T-1"]).await;
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"]["globex/T-1"]["calls"], 2);
    assert_eq!(calls["by_key"]["acme/T-1"]["calls"], 1);
}

#[tokio::test]
async fn entries_written_before_vendor_scoping_stay_their_vendors() {
    use rtp_durability::transaction::{Sha256, TransactionId};
    use rtp_durability::wal::{Source, WalRecord};
    let app = spawn_app().await;
    // An entry from before keys were scoped: under the bare id, recording
    // its vendor.
    let body = r#"{"transaction_id":"OLD-1"}"#;
    let at = chrono::Utc::now();
    let record = WalRecord {
        v: 1,
        transaction_id: TransactionId::parse("OLD-1").unwrap(),
        received_at: at,
        source: Source {
            vendor: Some("acme".into()),
            remote_addr: None,
            kafka: None,
        },
        sha256: Sha256::of(body.as_bytes()),
        payload: body.into(),
        expires_at: None,
        trace_parent: None,
    };
    let wal_ref = app.services.wal.append_json(&record, at).await.unwrap();
    let reg = record.registration_as(TransactionId::parse("OLD-1").unwrap(), &wal_ref);
    app.services.ledger.register(reg).await.unwrap();

    // Its vendor finds it: a repeat is a duplicate, not a new transaction.
    let r = app
        .post_raw(body.to_owned(), "application/json", Some(API_KEY))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["wal"]["ref"], wal_ref.to_string());
    assert_eq!(json(app.get_tx("OLD-1").await).await["vendor"], "acme");
    // Another vendor's OLD-1 is another transaction.
    let r = app.post_signed(body, now_unix()).await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        signed_get(&app, "/v1/transactions/OLD-1").await.status(),
        200
    );
    let r = app.admin_get("/v1/transactions/OLD-1?vendor=acme").await;
    assert_eq!(json(r).await["wal_ref"], wal_ref.to_string());
    // The reconciler sees the old entry as the WAL record's: nothing is
    // missing from the ledger.
    let now = chrono::Utc::now();
    let mut o = rtp_durability::reconcile::ReconcileOptions::new(
        now - chrono::Duration::hours(1),
        now + chrono::Duration::minutes(1),
        Duration::from_secs(3600),
    );
    o.dry_run = true;
    let report = app.services.reconciler().reconcile(&o).await.unwrap();
    assert_eq!(report.missing_from_ledger, 0, "{report:?}");
    assert_eq!(report.conflicting, 0, "{report:?}");
}

#[test]
fn queue_message_ids_stay_within_128_characters() {
    use rtp_durability::envelope::{Delivery, Envelope};
    use rtp_durability::transaction::{Registration, Sha256, TransactionId};
    let key = format!("{}/{}", "v".repeat(64), "i".repeat(128));
    let reg = Registration {
        transaction_id: TransactionId::parse_key(&key).unwrap(),
        sha256: Sha256::of(b"{}"),
        wal_ref: "wal/v1/2026/01/01/00/s.ndjson#0+2".parse().unwrap(),
        vendor: Some("v".repeat(64)),
        received_at: chrono::Utc::now(),
        expires_at: None,
    };
    for d in [
        Delivery::Initial,
        Delivery::Retry(3),
        Delivery::Replay("n".repeat(32)),
    ] {
        let m =
            Envelope::new(reg.clone(), bytes::Bytes::from_static(b"{}"), d.clone()).to_message();
        assert!(m.message_id.len() <= 128, "{d:?}: {}", m.message_id);
        let again = Envelope::new(reg.clone(), bytes::Bytes::from_static(b"{}"), d).to_message();
        assert_eq!(m.message_id, again.message_id, "the same copy, the same id");
        assert_eq!(m.properties["transaction_id"], key);
    }
    let short = Registration {
        transaction_id: TransactionId::parse_key("acme/T-1").unwrap(),
        ..reg
    };
    let m = Envelope::new(short, bytes::Bytes::from_static(b"{}"), Delivery::Initial).to_message();
    assert_eq!(m.message_id, "acme/T-1");
}

/// Issue 20, D4: a transaction id that reads like another's derived copy
/// (`X:retry:2` is what X's second attempt used to be sent as) is its own
/// transaction: both are processed, once each, and neither's message is
/// dropped by the queue's duplicate detection as a copy of the other.
#[tokio::test]
async fn an_id_shaped_like_another_ids_retry_copy_is_not_deduped_away() {
    let app = spawn_app().await;
    // X fails once: its retry copy (attempt 2) goes to the queue.
    let x = json!({"transaction_id": "X", "_mock": {"script": ["503", "ok"]}});
    assert_eq!(app.post_json(&x).await.status(), 202);
    app.drain_until_terminal(&["X"]).await;
    assert_eq!(
        app.state_of("X").await,
        rtp_durability::transaction::State::Success
    );
    // Then a vendor's transaction whose id is that copy's old message id.
    let r = app.post_json(&json!({"transaction_id": "X:retry:2"})).await;
    assert_eq!(r.status(), 202);
    for _ in 0..4 {
        if app.state_of("X:retry:2").await.is_terminal() {
            break;
        }
        app.processor
            .try_process_next(Duration::from_millis(500))
            .await
            .unwrap();
    }
    assert_eq!(
        app.state_of("X:retry:2").await,
        rtp_durability::transaction::State::Success,
        "X:retry:2 was never delivered: its message was dropped as a duplicate of X's retry copy"
    );
    let calls = app.mock_calls().await;
    assert_eq!(calls["by_key"][key("X")]["calls"], 2, "{calls}");
    assert_eq!(calls["by_key"][key("X:retry:2")]["calls"], 1, "{calls}");
}

/// Reads an HTTP answer's head from `stream`: its status, 0 if none came.
async fn status_of(stream: &mut TcpStream) -> u16 {
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer)
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A connection to `address` (`http://host:port`) from the local address `from`.
async fn connect_from(address: &str, from: [u8; 4]) -> std::io::Result<TcpStream> {
    let address: std::net::SocketAddr = address.trim_start_matches("http://").parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::from((from, 0)))?;
    sock.connect(address).await
}

/// One forged signed POST from `from` that never sends its body: its status.
async fn forged_once_from(address: &str, from: [u8; 4]) -> u16 {
    let Ok(mut stream) = connect_from(address, from).await else {
        return 0;
    };
    if stream
        .write_all(forged_signed_head("").as_bytes())
        .await
        .is_err()
    {
        return 0;
    }
    status_of(&mut stream).await
}

/// A genuine signed POST from `from` whose body comes `delay` after its head.
async fn genuine_late_from(address: &str, from: [u8; 4], id: &str, delay: Duration) -> u16 {
    let (head, body) = genuine_signed_post(id, "");
    let mut stream = connect_from(address, from).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(delay).await;
    let _ = stream.write_all(body.as_bytes()).await;
    status_of(&mut stream).await
}

/// An app whose unauthenticated pool has 8 places (2 per address) and whose
/// per-address rate is 1/s, burst 3.
async fn small_unauthenticated_pool() -> crate::support::TestApp {
    spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight_unauthenticated = 8;
            s.unauthenticated_rate_per_sec = 1;
            s.unauthenticated_rate_burst = 3;
        },
        ..Default::default()
    })
    .await
}

/// Issue 20, a fourth review of the eviction fix: forgers from more
/// addresses than the pool has places, one request each at a time, never
/// sending a body, evicted one another for free as fast as they could
/// reconnect (~2,000 evictions/s), and a new genuine signer whose body came
/// 300 ms after its head was evicted every time (10 of 10: 503). Now a
/// request is safe for its first second, each eviction costs the newcomer's
/// address a unit of its rate, and a full pool's waiters are served in turn.
#[tokio::test]
async fn forgers_churning_from_many_addresses_do_not_keep_a_new_signer_out() {
    let app = small_unauthenticated_pool().await;
    // Control, no forgers.
    let control = genuine_late_from(
        &app.address,
        [127, 0, 0, 5],
        "CH-CTRL",
        Duration::from_millis(300),
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut forgers = Vec::new();
    for ip in 10..22u8 {
        let stop = stop.clone();
        let address = app.address.clone();
        forgers.push(tokio::spawn(async move {
            let mut counts = std::collections::BTreeMap::<u16, usize>::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                *counts
                    .entry(forged_once_from(&address, [127, 0, 0, ip]).await)
                    .or_default() += 1;
            }
            counts
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut statuses = Vec::new();
    for i in 0..3 {
        statuses.push(
            genuine_late_from(
                &app.address,
                [127, 0, 0, 4],
                &format!("CH-{i}"),
                Duration::from_millis(300),
            )
            .await,
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = std::collections::BTreeMap::<u16, usize>::new();
    for f in forgers {
        for (k, v) in f.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    assert_eq!(control, 202);
    // The first is the one that matters: once it verified, the address is
    // vouched for and its requests wait in the vendors' pool.
    assert_eq!(
        statuses,
        [202, 202, 202],
        "forgers' answers meanwhile: {total:?}"
    );
}

/// Issue 20, a fifth review: forgers that line up many waiters ahead of a
/// new signer (each address at its share, its rate emptied with anonymous
/// requests so that it never evicts and waits for free) kept the signer
/// out when every newcomer to a full pool queued. Now each address has one
/// waiter at most, and evictions have a budget of their own.
#[tokio::test]
async fn forgers_lining_up_waiters_do_not_keep_a_new_signer_out() {
    let app = small_unauthenticated_pool().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for ip in 10..22u8 {
        // Two forged requests at a time (the address's share of 8)...
        for _ in 0..2 {
            let stop = stop.clone();
            let address = app.address.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    forged_once_from(&address, [127, 0, 0, ip]).await;
                }
            }));
        }
        // ...and anonymous requests that keep its rate empty.
        let stop = stop.clone();
        let base = app.address.clone();
        tasks.push(tokio::spawn(async move {
            let client = client_from([127, 0, 0, ip]);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client
                    .post(format!("{base}/v1/transactions"))
                    .header("Authorization", "Bearer wrong")
                    .body("{}")
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = genuine_late_from(
        &app.address,
        [127, 0, 0, 4],
        "LQ-0",
        Duration::from_millis(300),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    assert_eq!(first, 202, "a new signer behind lined-up forgers");
}

/// Issue 20, a sixth review: with the pool held by bodiless forged
/// requests started together (so they time out together) and one forged
/// waiter always queued ahead, the one place a new signer's eviction freed
/// went to that waiter, and nothing else freed a place before the forgers'
/// timeouts: the signer got 503. Now every waiter keeps asking for
/// evictions while it waits, so places keep freeing in turn.
#[tokio::test]
async fn a_queued_forger_ahead_does_not_keep_a_new_signer_out() {
    let app = spawn_app_with(AppOptions {
        configure: |s| {
            s.max_in_flight_unauthenticated = 8;
            s.request_timeout_secs = 10.0;
        },
        ..Default::default()
    })
    .await;
    // Holders: 2 + 2 + 2 + 1 forged requests; W: 1 more and a waiter.
    let mut tasks = Vec::new();
    for (ip, n) in [(10u8, 2), (11, 2), (12, 2), (13, 1), (14, 3)] {
        for _ in 0..n {
            let address = app.address.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    forged_once_from(&address, [127, 0, 0, ip]).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = genuine_late_from(
        &app.address,
        [127, 0, 0, 4],
        "QF-0",
        Duration::from_millis(300),
    )
    .await;
    for t in tasks {
        t.abort();
    }
    assert_eq!(first, 202, "a new signer behind a queued forger");
}
