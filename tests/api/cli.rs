//! The `rtpd` command line against a running app's data: WAL views, config
//! and errors that name the variable.

use crate::support::process::rtpd;
use crate::support::spawn_app;
use serde_json::json;

#[tokio::test]
async fn wal_ls_and_cat_show_segments_and_records() {
    let app = spawn_app().await;
    for i in 0..3 {
        assert_eq!(
            app.post_json(&json!({"transaction_id": format!("CLI-{i}"), "n": i}))
                .await
                .status(),
            202
        );
    }
    let run = |args: &[&str]| {
        let out = rtpd()
            .args(args)
            .env("RTPD_DATA_DIR", app.data_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ls = run(&["wal", "ls", "--from", "1h"]);
    assert!(ls.trim_end().ends_with("3 records"), "{ls}");
    assert!(ls.contains("wal/v1/"), "{ls}");
    let by_id = run(&["wal", "cat", "CLI-1"]);
    let rec: serde_json::Value = serde_json::from_str(by_id.trim()).unwrap();
    assert_eq!(rec["transaction_id"], "CLI-1");
    assert_eq!(rec["payload"], "{\"n\":1,\"transaction_id\":\"CLI-1\"}");
    let wal_ref = app.record("CLI-2").await.wal_ref;
    let by_ref = run(&["wal", "cat", &wal_ref.to_string()]);
    assert!(by_ref.contains("\"CLI-2\""), "{by_ref}");
    let missing = rtpd()
        .args(["wal", "cat", "NOPE"])
        .env("RTPD_DATA_DIR", app.data_dir())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).starts_with("rtpd: no WAL record for NOPE"));
}

#[test]
fn a_bad_setting_exits_1_with_one_line_naming_the_variable() {
    let out = rtpd()
        .args(["config"])
        .env("RTPD_MAX_RETRIES", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("RTPD_MAX_RETRIES"), "{err}");
    let ok = rtpd()
        .args(["config"])
        .env("RTPD_VENDOR_KEYS", "acme:sha256:secret-looking")
        .output()
        .unwrap();
    let text = String::from_utf8(ok.stdout).unwrap();
    assert!(text.contains("RTPD_VENDOR_KEYS = \"[redacted]\""), "{text}");
    assert!(!text.contains("secret-looking"));
}
