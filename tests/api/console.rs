//! The operations console's gate, in process (issue 18): who gets in (a
//! session from the login form, or the bearer token), the session cookie's
//! flags, CSRF and Origin checks on actions, the security headers,
//! `RTPD_CONSOLE=false`, and payloads kept out of URLs and shown redacted.
//! The same flows in a real browser: tests/console/browser.py.

use crate::support::console::{ConsoleClient, FORM, csrf_in, form_body, urls_in};
use crate::support::{ADMIN_TOKEN, API_KEY, AppOptions, TestApp, key, spawn_app, spawn_app_with};
use rtp_durability::transaction::State;
use serde_json::json;

/// A transaction the downstream refuses for good (400): dead-lettered.
async fn dead_lettered(app: &TestApp, id: &str, extra: serde_json::Value) {
    let mut body =
        json!({"transaction_id": id, "amount": "10.00", "_mock": {"script": ["400", "ok"]}});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    assert_eq!(app.post_json(&body).await.status(), 202);
    app.drain_until_terminal(&[id]).await;
    assert_eq!(app.state_of(id).await, State::DeadLetter);
}

async fn logged_in(app: &TestApp) -> ConsoleClient {
    let mut c = ConsoleClient::new(&app.address);
    let r = c.login(ADMIN_TOKEN).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console");
    c
}

fn assert_security_headers(r: &reqwest::Response, what: &str) {
    let h = r.headers();
    let csp = h
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no CSP"))
        .to_str()
        .unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(part), "{what}: CSP {csp} lacks {part}");
    }
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "no-referrer", "{what}");
    assert_eq!(h["cache-control"], "no-store", "{what}");
    assert_eq!(h["x-frame-options"], "DENY", "{what}");
}

#[tokio::test]
async fn without_a_token_pages_send_to_the_login_and_fragments_answer_401() {
    let app = spawn_app().await;
    let c = ConsoleClient::new(&app.address);
    for page in [
        "/console",
        "/console/dlq",
        "/console/find",
        "/console/wal",
        "/console/tx?key=acme/T",
    ] {
        let r = c.get(page).await;
        assert_eq!(r.status(), 303, "{page}");
        assert_eq!(r.headers()["location"], "/console/login", "{page}");
    }
    for fragment in ["/console/overview.frag", "/console/tx/live?key=acme/T"] {
        assert_eq!(c.get(fragment).await.status(), 401, "{fragment}");
    }
    let r = c.get("/console/login").await;
    assert_eq!(r.status(), 200);
    assert_security_headers(&r, "login page");
    let page = r.text().await.unwrap();
    assert!(
        page.contains(r#"<form class="card login" method="post" action="/console/login">"#),
        "{page}"
    );
    assert!(page.contains(r#"type="password""#), "{page}");
    // An action without a session does nothing: no session, no CSRF token.
    let r = c
        .post(
            "/console/replay",
            &[("target", "tx"), ("keys", "acme/T"), ("why", "x")],
            &[],
        )
        .await;
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn a_wrong_token_or_a_vendor_key_is_refused_and_sets_no_cookie() {
    let app = spawn_app().await;
    for token in ["not-the-token", API_KEY, ""] {
        let mut c = ConsoleClient::new(&app.address);
        let r = c.login(token).await;
        assert!(
            r.status() == 401 || r.status() == 400,
            "{token:?}: {}",
            r.status()
        );
        assert!(r.headers().get("set-cookie").is_none(), "{token:?}");
        assert!(c.cookie.is_none());
        assert_eq!(c.get("/console").await.status(), 303);
    }
    // A vendor key as the bearer token is no way in either.
    let c = ConsoleClient::new(&app.address);
    let r = c
        .client
        .get(format!("{}/console", app.address))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    // A made-up session id is no session.
    let mut c = ConsoleClient::new(&app.address);
    c.cookie = Some(format!("rtpd_console={}", "ab".repeat(32)));
    assert_eq!(c.get("/console").await.status(), 303);
}

#[tokio::test]
async fn login_sets_an_http_only_same_site_strict_cookie_on_console_holding_no_token() {
    let app = spawn_app().await;
    let mut c = ConsoleClient::new(&app.address);
    let r = c.login(ADMIN_TOKEN).await;
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.starts_with("rtpd_console="), "{set}");
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=28800",
    ] {
        assert!(set.contains(flag), "{set} lacks {flag}");
    }
    assert!(!set.contains(ADMIN_TOKEN), "{set}");
    let id = set
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("rtpd_console=");
    assert_eq!(id.len(), 64, "a random 256-bit session id: {id}");
    let r = c.get("/console").await;
    assert_eq!(r.status(), 200);
    assert_security_headers(&r, "overview");
    let page = r.text().await.unwrap();
    assert!(page.contains("Signed in as <strong>ops</strong>"), "{page}");
    assert!(!page.contains(ADMIN_TOKEN));
    // Every other answer of the console carries the headers too.
    for path in [
        "/console/overview.frag",
        "/console/dlq",
        "/console/find",
        "/console/wal",
        "/console/assets/console.css",
        "/console/assets/console.js",
        "/console/no-such-page",
        // No key: a query the pages never send.
        "/console/tx",
    ] {
        assert_security_headers(&c.get(path).await, path);
    }
    let r = c.get("/console/tx").await;
    assert_eq!(r.status(), 400);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    // Logged in, the login page sends back to the console.
    assert_eq!(c.get("/console/login").await.status(), 303);
    // A second login is another session, with another CSRF token.
    let mut c2 = ConsoleClient::new(&app.address);
    c2.login(ADMIN_TOKEN).await;
    assert_ne!(c.cookie, c2.cookie);
    assert_ne!(c.csrf().await, c2.csrf().await);
}

#[tokio::test]
async fn an_action_without_the_sessions_csrf_token_or_from_another_origin_is_refused() {
    let app = spawn_app().await;
    dead_lettered(&app, "CSRF-1", json!({})).await;
    let c = logged_in(&app).await;
    let csrf = c.csrf().await;
    let k = key("CSRF-1");
    fn form<'a>(k: &'a str, csrf: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
        let mut f = vec![
            ("target", "tx"),
            ("keys", k),
            ("seen", "dead_letter"),
            ("why", "a test"),
        ];
        if let Some(t) = csrf {
            f.push(("csrf", t));
        }
        f
    }
    // No token, a wrong one, another session's.
    let mut other = ConsoleClient::new(&app.address);
    other.login(ADMIN_TOKEN).await;
    let others = other.csrf().await;
    for bad in [None, Some("0".repeat(64).as_str()), Some(others.as_str())] {
        let r = c.post("/console/replay", &form(&k, bad), &[]).await;
        assert_eq!(r.status(), 403, "{bad:?}");
        let page = r.text().await.unwrap();
        assert!(page.contains("CSRF"), "{page}");
    }
    // The right token from another site.
    let r = c
        .post(
            "/console/replay",
            &form(&k, Some(&csrf)),
            &[("Origin", "http://evil.example")],
        )
        .await;
    assert_eq!(r.status(), 403);
    let r = c
        .post(
            "/console/replay",
            &form(&k, Some(&csrf)),
            &[("Sec-Fetch-Site", "cross-site")],
        )
        .await;
    assert_eq!(r.status(), 403);
    // Another port of the same host is another origin.
    let r = c
        .post(
            "/console/replay",
            &form(&k, Some(&csrf)),
            &[("Sec-Fetch-Site", "same-site")],
        )
        .await;
    assert_eq!(r.status(), 403);
    // The dry run is an action too.
    let r = c
        .post(
            "/console/replay/preview",
            &[
                ("target", "tx"),
                ("key", k.as_str()),
                ("seen", "dead_letter"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status(), 403);
    assert_eq!(
        app.state_of("CSRF-1").await,
        State::DeadLetter,
        "nothing was replayed"
    );
    // The same form with its token, from this origin, replays it (a
    // browser under `Referrer-Policy: no-referrer` sends `Origin: null`).
    let r = c
        .post(
            "/console/replay",
            &form(&k, Some(&csrf)),
            &[("Origin", "null"), ("Sec-Fetch-Site", "same-origin")],
        )
        .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains(r#"id="replayed-count" data-count="1""#),
        "{page}"
    );
    assert_eq!(app.state_of("CSRF-1").await, State::Pending);
    // Logging out ends the session: its cookie and CSRF token are no use after.
    let r = c
        .post("/console/logout", &[("csrf", csrf.as_str())], &[])
        .await;
    assert_eq!(r.status(), 303);
    assert_eq!(c.get("/console").await.status(), 303);
    let r = c.post("/console/replay", &form(&k, Some(&csrf)), &[]).await;
    assert_eq!(r.status(), 303);
}

#[tokio::test]
async fn a_replay_needs_a_reason_and_a_forced_one_the_acknowledgement() {
    let app = spawn_app().await;
    dead_lettered(&app, "WHY-1", json!({})).await;
    let c = logged_in(&app).await;
    let csrf = c.csrf().await;
    let k = key("WHY-1");
    let r = c
        .post(
            "/console/replay",
            &[
                ("csrf", &csrf),
                ("target", "tx"),
                ("keys", &k),
                ("seen", "dead_letter"),
                ("why", "  "),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(app.state_of("WHY-1").await, State::DeadLetter);
    // A success: the dry run warns, the replay wants the box ticked.
    assert_eq!(
        app.post_json(&json!({"transaction_id": "OK-1"}))
            .await
            .status(),
        202
    );
    app.drain_until_terminal(&["OK-1"]).await;
    let ok = key("OK-1");
    let r = c
        .post(
            "/console/replay/preview",
            &[
                ("csrf", &csrf),
                ("target", "tx"),
                ("key", &ok),
                ("seen", "success"),
                ("force", "on"),
            ],
            &[],
        )
        .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("the downstream will be called again"),
        "{page}"
    );
    assert!(page.contains(r#"data-count="1""#), "{page}");
    let forced = [
        ("csrf", csrf.as_str()),
        ("target", "tx"),
        ("keys", &ok),
        ("seen", "success"),
        ("force", "on"),
        ("why", "downstream lost it"),
    ];
    let r = c.post("/console/replay", &forced, &[]).await;
    assert_eq!(r.status(), 400);
    assert_eq!(app.state_of("OK-1").await, State::Success);
    let mut acknowledged = forced.to_vec();
    acknowledged.push(("understood", "on"));
    let r = c.post("/console/replay", &acknowledged, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.state_of("OK-1").await, State::Pending);
}

#[tokio::test]
async fn the_bearer_token_opens_the_console_without_a_session() {
    let app = spawn_app().await;
    let r = app.admin_get("/console").await;
    assert_eq!(r.status(), 200);
    assert_security_headers(&r, "overview by bearer");
    dead_lettered(&app, "BEARER-1", json!({})).await;
    let k = key("BEARER-1");
    // No cookie, so no CSRF token is needed; Origin is still checked.
    let r = app
        .client
        .post(format!("{}/console/replay", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .header("Content-Type", FORM)
        .body(form_body(&[
            ("target", "tx"),
            ("keys", k.as_str()),
            ("seen", "dead_letter"),
            ("why", "bearer"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(app.state_of("BEARER-1").await, State::Pending);
}

#[tokio::test]
async fn rtpd_console_false_leaves_the_console_out() {
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(|s| s.console = false)),
        ..Default::default()
    })
    .await;
    for path in ["/console", "/console/login", "/console/assets/console.js"] {
        assert_eq!(app.admin_get(path).await.status(), 404, "{path}");
    }
    let r = app
        .client
        .post(format!("{}/console/login", app.address))
        .header("Content-Type", FORM)
        .body(form_body(&[("token", ADMIN_TOKEN)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("set-cookie").is_none());
}

#[tokio::test]
async fn payloads_are_shown_redacted_and_never_in_a_url() {
    let app = spawn_app().await;
    let marker = format!("MARKER{}", uuid::Uuid::new_v4().simple());
    let iban = "DE89370400440532013000";
    dead_lettered(
        &app,
        "PAY-1",
        json!({"memo": marker, "debtor": {"iban": iban, "card_number": "4111111111111111"}}),
    )
    .await;
    let c = logged_in(&app).await;
    let k = key("PAY-1");
    let timeline = c
        .text(&format!("/console/tx?key={}", k.replace('/', "%2F")))
        .await;
    assert!(timeline.contains(&marker), "the payload is on the timeline");
    assert!(timeline.contains("[redacted]"), "{timeline}");
    assert!(!timeline.contains(iban), "the IBAN is redacted");
    assert!(
        !timeline.contains("4111111111111111"),
        "the card number is redacted"
    );
    assert!(timeline.contains("2 fields redacted"), "{timeline}");
    assert!(timeline.contains("downstream answered 400"), "{timeline}");
    assert!(timeline.contains("Attempt 1: dead-lettered"), "{timeline}");
    assert!(
        timeline.contains("Call took"),
        "the attempt's latency: {timeline}"
    );
    let rec = app.record("PAY-1").await;
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let encoded = enc(&rec.wal_ref.to_string());
    let record = c.text(&format!("/console/wal/record?ref={encoded}")).await;
    assert!(
        record.contains(&marker) && !record.contains(iban),
        "{record}"
    );
    let today = chrono::Utc::now();
    let pages = [
        timeline.clone(),
        record,
        c.text("/console").await,
        c.text("/console/dlq").await,
        c.text("/console/find?id=PAY-1").await,
        c.text(&format!(
            "/console/find?vendor=acme&from={}&to={}",
            (today - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M"),
            (today + chrono::Duration::minutes(5)).format("%Y-%m-%dT%H:%M")
        ))
        .await,
        c.text(&format!(
            "/console/wal/segment?key={}",
            enc(&rec.wal_ref.key)
        ))
        .await,
        c.text(&format!(
            "/console/wal/hour?at={}",
            rec.created_at.format("%Y-%m-%dT%H:00")
        ))
        .await,
    ];
    for page in &pages {
        assert!(csrf_in(page).is_some());
        for url in urls_in(page) {
            assert!(!url.contains(&marker), "a payload in a URL: {url}");
            assert!(!url.contains(iban), "a payload in a URL: {url}");
        }
    }
    // Each page links the payment's timeline.
    assert!(pages[3].contains("acme%2FPAY-1"), "{}", pages[3]);
    assert!(pages[4].contains("acme%2FPAY-1"), "{}", pages[4]);
    assert!(pages[5].contains("acme%2FPAY-1"), "{}", pages[5]);
    assert!(pages[6].contains("acme%2FPAY-1"), "{}", pages[6]);
    assert!(pages[7].contains(&enc(&rec.wal_ref.key)), "{}", pages[7]);
    // The WAL view reads the WAL only, not the journal or the rejected calls
    // that share its store.
    let journal_ref = format!(
        "outcomes/v1/{}",
        rec.wal_ref.key.trim_start_matches("wal/v1/")
    );
    for path in [
        format!("/console/wal/segment?key={}", enc(&journal_ref)),
        format!(
            "/console/wal/record?ref={}",
            enc(&format!("{journal_ref}#0+10"))
        ),
    ] {
        assert_eq!(c.get(&path).await.status(), 400, "{path}");
    }
    // Nor in the rejected-call records or the URLs the gate logs.
    let (_, rejected) = crate::support::rejected_calls(&app).await;
    assert!(!rejected.contains(&marker));
}

#[tokio::test]
async fn the_dead_letter_view_groups_by_reason_and_a_group_replay_counts_first() {
    let app = spawn_app_with(AppOptions {
        max_retries: 0,
        ..Default::default()
    })
    .await;
    dead_lettered(&app, "G-1", json!({})).await;
    dead_lettered(&app, "G-2", json!({})).await;
    // Retries exhausted: another reason.
    let body = json!({"transaction_id": "G-3", "_mock": {"script": ["503", "ok"]}});
    assert_eq!(app.post_json(&body).await.status(), 202);
    app.drain_until_terminal(&["G-3"]).await;
    assert_eq!(app.state_of("G-3").await, State::DeadLetter);
    let c = logged_in(&app).await;
    let page = c.text("/console/dlq").await;
    assert!(page.contains("3 dead-lettered messages"), "{page}");
    let groups: Vec<&str> = page
        .match_indices(r#"<span class="dl-reason">"#)
        .map(|(i, m)| {
            let rest = &page[i + m.len()..];
            &rest[..rest.find('<').unwrap()]
        })
        .collect();
    assert_eq!(groups.len(), 2, "two reasons: {groups:?}");
    let permanent = groups
        .iter()
        .find(|g| g.to_lowercase().contains("permanent"))
        .unwrap_or_else(|| panic!("{groups:?}"));
    let csrf = c.csrf().await;
    // A time range: all three were dead-lettered in the last minutes, none
    // an hour ago.
    let now = chrono::Utc::now();
    let t = |d: chrono::Duration| (now + d).format("%Y-%m-%dT%H:%M:%S").to_string();
    for (from, to, want) in [
        (
            t(-chrono::Duration::minutes(5)),
            t(chrono::Duration::minutes(1)),
            "3",
        ),
        (
            t(-chrono::Duration::hours(2)),
            t(-chrono::Duration::hours(1)),
            "0",
        ),
    ] {
        let r = c
            .post(
                "/console/replay/preview",
                &[
                    ("csrf", &csrf),
                    ("target", "dlq-range"),
                    ("from", &from),
                    ("to", &to),
                ],
                &[],
            )
            .await;
        let preview = r.text().await.unwrap();
        assert!(
            preview.contains(&format!(r#"id="dry-run-count" data-count="{want}""#)),
            "{from}..{to}: {preview}"
        );
        if want == "0" {
            assert!(preview.contains("Nothing to replay."), "{preview}");
        }
    }
    let r = c
        .post(
            "/console/replay/preview",
            &[
                ("csrf", &csrf),
                ("target", "dlq-group"),
                ("group", permanent),
            ],
            &[],
        )
        .await;
    let preview = r.text().await.unwrap();
    assert!(
        preview.contains(r#"id="dry-run-count" data-count="2""#),
        "{preview}"
    );
    assert_eq!(
        app.state_of("G-1").await,
        State::DeadLetter,
        "a dry run changes nothing"
    );
    let keys = crate::support::console::hidden_field(&preview, "keys").unwrap();
    let seqs = crate::support::console::hidden_field(&preview, "seqs").unwrap();
    assert_eq!(keys.split(' ').count(), 2, "{keys}");
    let r = c
        .post(
            "/console/replay",
            &[
                ("csrf", &csrf),
                ("target", "dlq-group"),
                ("keys", &keys),
                ("seqs", &seqs),
                ("seen", "dead_letter"),
                ("why", "fixed the 400"),
            ],
            &[],
        )
        .await;
    let done = r.text().await.unwrap();
    assert!(done.contains(r#"data-count="2""#), "{done}");
    assert!(
        done.contains("2 of 2 dead-lettered messages removed"),
        "{done}"
    );
    assert_eq!(app.state_of("G-1").await, State::Pending);
    assert_eq!(app.state_of("G-2").await, State::Pending);
    assert_eq!(app.state_of("G-3").await, State::DeadLetter);
    // Journaled with the operator and the reason.
    let timeline = c.text("/console/tx?key=acme%2FG-1").await;
    assert!(timeline.contains("Replayed by console:ops"), "{timeline}");
    assert!(timeline.contains("fixed the 400"), "{timeline}");
    let left = c.text("/console/dlq").await;
    assert!(left.contains("1 dead-lettered messages"), "{left}");
}

/// Removing a token from `RTPD_ADMIN_TOKENS_FILE` ends the console sessions
/// logged in with it (the token is checked again on every request): a real
/// `rtpd api`, the file replaced, SIGHUP.
#[tokio::test]
async fn a_revoked_admin_token_ends_its_console_sessions() {
    use crate::support::process::{Proc, free_port, rtpd, wait_http_ok};
    use rtp_durability::auth::hash_secret;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    let (kept, revoked) = ("console-kept-token", "console-revoked-token");
    let line = |name: &str, t: &str| format!("{name}:sha256:{}\n", hash_secret(t));
    std::fs::write(
        &tokens,
        format!("{}{}", line("alice", revoked), line("bob", kept)),
    )
    .unwrap();
    let port = free_port();
    let proc = Proc(
        rtpd()
            .arg("api")
            .env("RTPD_DATA_DIR", dir.path().join("data"))
            .env("RTPD_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env(
                "RTPD_VENDOR_KEYS",
                format!("acme:sha256:{}", hash_secret(API_KEY)),
            )
            .env("RTPD_ADMIN_TOKENS_FILE", &tokens)
            .env("RTPD_LOG_LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;
    let mut alice = ConsoleClient::new(&base);
    assert_eq!(alice.login(revoked).await.status(), 303);
    let mut bob = ConsoleClient::new(&base);
    assert_eq!(bob.login(kept).await.status(), 303);
    assert_eq!(alice.get("/console").await.status(), 200);
    // Alice's token goes, written aside and renamed as a secret volume does.
    let aside = tokens.with_extension("new");
    std::fs::write(&aside, line("bob", kept)).unwrap();
    std::fs::rename(&aside, &tokens).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alice.get("/console").await.status() != 303 {
        assert!(
            Instant::now() < deadline,
            "the revoked token's session lives on"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        alice.get("/console/overview.frag").await.status(),
        401,
        "its fragments too"
    );
    assert_eq!(
        bob.get("/console").await.status(),
        200,
        "the other session stays"
    );
    assert_eq!(alice.login(revoked).await.status(), 401);
}
