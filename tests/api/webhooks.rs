//! Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64>`) next to rtpd's own `X-Rtpd-*` scheme,
//! per vendor. The signatures here are made by the `standardwebhooks` package
//! from PyPI (an independent implementation of the spec), run with the
//! Python that `scripts/test.sh` prepares (`RTPD_TEST_PYTHON`).

use crate::support::{
    AppOptions, HMAC_SECRET, HMAC_VENDOR, TestApp, json, now_unix, spawn_app_with,
};
use serde_json::Value;
use std::process::Command;

/// Hooli signs only with Standard Webhooks.
const HOOLI_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Globex signs both ways while it migrates (same vendor, two schemes).
const GLOBEX_WEBHOOK_SECRET: &str = "whsec_cnRwZC1zdGFuZGFyZC13ZWJob29rcy10ZXN0LWtleSE=";

const SIGN: &str = r#"
import sys
from datetime import datetime, timezone
from standardwebhooks.webhooks import Webhook
secret, msg_id, ts, body = sys.argv[1:5]
print(Webhook(secret).sign(msg_id, datetime.fromtimestamp(int(ts), tz=timezone.utc), body))
"#;

/// `v1,<base64>` for `{id}.{ts}.{body}`, computed by the `standardwebhooks` package.
fn library_signature(secret: &str, id: &str, ts: i64, body: &str) -> String {
    let python = std::env::var("RTPD_TEST_PYTHON").expect(
        "RTPD_TEST_PYTHON is not set: run the tests with scripts/test.sh, which prepares a \
         Python with tests/requirements.txt (standardwebhooks)",
    );
    let out = Command::new(python)
        .args(["-c", SIGN, secret, id, &ts.to_string(), body])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sig = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(sig.starts_with("v1,"), "{sig}");
    sig
}

async fn app() -> TestApp {
    spawn_app_with(AppOptions {
        tweak: Some(Box::new(|s| {
            let file = s.data_dir.join("vendor-keys-webhooks");
            std::fs::write(
                &file,
                format!(
                    "{HMAC_VENDOR}:hmac:{HMAC_SECRET}\n\
                     {HMAC_VENDOR}:whsec:{GLOBEX_WEBHOOK_SECRET}\n\
                     hooli:whsec:{HOOLI_SECRET}\n"
                ),
            )
            .unwrap();
            s.vendor_keys_file = Some(file);
        })),
        ..Default::default()
    })
    .await
}

async fn deliver(
    app: &TestApp,
    id: &str,
    ts: i64,
    signature: &str,
    body: &str,
) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/transactions", app.address))
        .header("Content-Type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn refused(r: reqwest::Response, reason_in_message: &str) -> Value {
    assert_eq!(r.status(), 401);
    let b = json(r).await;
    assert_eq!(b["error"], "unauthenticated", "{b}");
    assert!(
        b["message"].as_str().unwrap().contains(reason_in_message),
        "{b}"
    );
    b
}

#[tokio::test]
async fn a_delivery_signed_by_the_standardwebhooks_library_is_accepted_once_per_attempt() {
    let app = app().await;
    let body = r#"{"transaction_id":"WH-1","amount":"5.00"}"#;
    let ts = now_unix();
    let sig = library_signature(HOOLI_SECRET, "msg_wh1", ts, body);
    let r = deliver(&app, "msg_wh1", ts, &sig, body).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    assert_eq!(
        app.record("WH-1").await.vendor.as_deref(),
        Some("hooli"),
        "the secret that matched names the vendor"
    );

    // The same attempt again (a captured request replayed): refused.
    refused(
        deliver(&app, "msg_wh1", ts, &sig, body).await,
        "already used",
    )
    .await;

    // The sender's retry of the same event: same webhook-id, a new timestamp
    // and signature. Accepted, and answered as the transaction it already is.
    let retry_sig = library_signature(HOOLI_SECRET, "msg_wh1", ts + 1, body);
    let r = deliver(&app, "msg_wh1", ts + 1, &retry_sig, body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["duplicate"], true);

    // Any change to the body, the id or the timestamp breaks the signature.
    let other = r#"{"transaction_id":"WH-1","amount":"500.00"}"#;
    let sig2 = library_signature(HOOLI_SECRET, "msg_wh2", ts, body);
    refused(
        deliver(&app, "msg_wh2", ts, &sig2, other).await,
        "does not match",
    )
    .await;
    refused(
        deliver(&app, "msg_wh3", ts, &sig2, body).await,
        "does not match",
    )
    .await;
    refused(
        deliver(&app, "msg_wh2", ts + 2, &sig2, body).await,
        "does not match",
    )
    .await;

    // Outside the window (RTPD_SIGNATURE_WINDOW_SECS), either way.
    for skew in [-400, 400] {
        let old = library_signature(HOOLI_SECRET, "msg_old", ts + skew, body);
        refused(
            deliver(&app, "msg_old", ts + skew, &old, body).await,
            "outside the replay window",
        )
        .await;
    }
    // A secret rtpd does not know.
    let stranger = library_signature(
        "whsec_c3RyYW5nZXItc2VjcmV0LW5vdC1jb25maWd1cmVk",
        "msg_x",
        ts,
        body,
    );
    refused(
        deliver(&app, "msg_x", ts, &stranger, body).await,
        "does not match",
    )
    .await;
    refused(
        deliver(&app, "msg_y", ts, "v1,not base64!", body).await,
        "webhook-signature",
    )
    .await;
    let counts = app.services.ledger.counts().await.unwrap();
    assert_eq!(counts.total(), 1, "only WH-1 was accepted");
}

#[tokio::test]
async fn several_signatures_rotate_and_a_vendor_may_use_both_schemes() {
    let app = app().await;
    let ts = now_unix();
    // During the sender's key rotation it sends the old and the new
    // signature, space separated; an asymmetric `v1a` one is skipped.
    let body = r#"{"transaction_id":"WH-ROT","amount":"1.00"}"#;
    let good = library_signature(HOOLI_SECRET, "msg_rot", ts, body);
    let stale = library_signature(
        "whsec_b2xkLXNlY3JldC1ub3QtY29uZmlndXJlZC1hbnktbW9yZQ==",
        "msg_rot",
        ts,
        body,
    );
    let header = format!("{stale} v1a,aG5PM2Y5VDhZdHU5SHdyWHNsdnVtbFVwcXROVnFraA== {good}");
    let r = deliver(&app, "msg_rot", ts, &header, body).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());

    // Globex: Standard Webhooks and X-Rtpd-* both work.
    let body = r#"{"transaction_id":"WH-GLOBEX-1"}"#;
    let sig = library_signature(GLOBEX_WEBHOOK_SECRET, "msg_g1", ts, body);
    let r = deliver(&app, "msg_g1", ts, &sig, body).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    assert_eq!(
        app.record("WH-GLOBEX-1").await.vendor.as_deref(),
        Some(HMAC_VENDOR)
    );
    let r = app
        .post_signed(r#"{"transaction_id":"WH-GLOBEX-2"}"#, ts)
        .await;
    assert_eq!(r.status(), 202);

    // Hooli declared only Standard Webhooks: rtpd's own scheme is not its.
    let sig = rtp_durability::auth::sign(b"whatever-secret-0123456789", ts, b"{}").unwrap();
    let r = app
        .client
        .post(format!("{}/v1/transactions", app.address))
        .header("Content-Type", "application/json")
        .header("X-Rtpd-Vendor", "hooli")
        .header("X-Rtpd-Timestamp", ts.to_string())
        .header("X-Rtpd-Signature", sig)
        .body("{}")
        .send()
        .await
        .unwrap();
    refused(r, "unknown vendor").await;
}
