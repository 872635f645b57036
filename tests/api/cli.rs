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

fn rtpd_in(app: &crate::support::TestApp, args: &[&str]) -> std::process::Output {
    rtpd()
        .args(args)
        .env("RTPD_DATA_DIR", app.data_dir())
        .output()
        .unwrap()
}

#[tokio::test]
async fn reconcile_dry_run_exits_3_on_drift_0_without_2_on_usage_and_1_on_failure() {
    let app = spawn_app().await;
    let code = |args: &[&str]| {
        let out = rtpd_in(&app, args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (c, out, err) = code(&["reconcile", "--dry-run", "--from", "1h"]);
    assert_eq!(c, Some(0), "nothing there: no drift\n{out}{err}");

    assert_eq!(
        app.post_json(&json!({"transaction_id": "RC-1"}))
            .await
            .status(),
        202
    );
    // Pending for less than the threshold: nothing overdue yet.
    let (c, out, err) = code(&["reconcile", "--dry-run", "--from", "1h"]);
    assert_eq!(c, Some(0), "{out}{err}");
    // With a zero threshold the pending transaction is overdue: drift.
    let (c, out, err) = code(&[
        "reconcile",
        "--dry-run",
        "--from",
        "1h",
        "--pending-after-secs",
        "0",
    ]);
    assert_eq!(c, Some(3), "drift found\n{out}{err}");
    assert!(out.contains("would do:") && out.contains("RC-1"), "{out}");
    assert!(err.is_empty(), "drift is not an error: {err}");

    app.drain_until_terminal(&["RC-1"]).await;
    let (c, out, err) = code(&[
        "reconcile",
        "--dry-run",
        "--from",
        "1h",
        "--pending-after-secs",
        "0",
    ]);
    assert_eq!(c, Some(0), "finished: no drift\n{out}{err}");

    let (c, _, err) = code(&["reconcile", "--dry-run", "--no-such-flag"]);
    assert_eq!(c, Some(2), "usage error: {err}");
    let (c, _, err) = code(&["reconcile", "--from", "yesterday-ish"]);
    assert_eq!(c, Some(2), "bad flag value: {err}");

    let failed = rtpd()
        .args(["reconcile", "--dry-run"])
        .env("RTPD_DATA_DIR", app.data_dir())
        .env("RTPD_MAX_RETRIES", "many")
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn every_subcommands_help_lists_the_rtpd_variables_it_reads() {
    let help = |args: &[&str]| {
        let out = rtpd().args(args).arg("--help").output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let names = String::from_utf8(
        rtpd()
            .args(["config", "--env-names"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let names: Vec<&str> = names.lines().collect();
    assert!(names.len() > 40, "{names:?}");
    // `serve` and `dev` read every setting; so does `config`, which prints them.
    for cmd in ["serve", "dev", "config"] {
        let text = help(&[cmd]);
        assert!(text.contains("Environment:"), "{cmd}: {text}");
        for n in &names {
            assert!(text.contains(n), "rtpd {cmd} --help does not mention {n}");
        }
    }
    // Each part lists what it reads, and only that.
    let api = help(&["api"]);
    for n in [
        "RTPD_VENDOR_KEYS_FILE",
        "RTPD_PUBLIC_METRICS",
        "RTPD_CREDENTIALS_POLL_SECS",
        "RTPD_WAL",
        "RTPD_REDIS_URL",
    ] {
        assert!(api.contains(n), "api: {n}\n{api}");
    }
    assert!(!api.contains("RTPD_DOWNSTREAM_URL"), "{api}");
    let processor = help(&["processor"]);
    for n in [
        "RTPD_DOWNSTREAM_URL",
        "RTPD_ADMIN_TOKENS_FILE",
        "RTPD_PUBLIC_METRICS",
        "RTPD_RECONCILE_INTERVAL_SECS",
    ] {
        assert!(processor.contains(n), "processor: {n}\n{processor}");
    }
    assert!(!processor.contains("RTPD_VENDOR_KEYS_FILE"), "{processor}");
    // A flag that stands for a setting says so, as clap does.
    let reconcile = help(&["reconcile"]);
    assert!(
        reconcile.contains("[env: RTPD_RECONCILE_PENDING_AFTER_SECS"),
        "{reconcile}"
    );
    assert!(
        reconcile.contains("RTPD_SERVICEBUS_NAMESPACE"),
        "{reconcile}"
    );
    assert!(reconcile.contains("Exit status:"), "{reconcile}");
    assert!(help(&["replay"]).contains("[env: USER"));
    // Nested subcommands list them too.
    for args in [
        &["dlq", "purge"][..],
        &["wal", "cat"],
        &["rebuild-ledger"],
        &["replay"],
    ] {
        let text = help(args);
        assert!(
            text.contains("RTPD_LEDGER") && text.contains("RTPD_QUEUE"),
            "{args:?}: {text}"
        );
    }
    // Every subcommand has the section, at least for logging.
    for cmd in [
        "dev",
        "serve",
        "api",
        "processor",
        "mock-downstream",
        "produce",
        "reconcile",
        "replay",
        "wal",
        "rebuild-ledger",
        "dlq",
        "config",
        "healthcheck",
    ] {
        let text = help(&[cmd]);
        assert!(
            text.contains("Environment:") && text.contains("RTPD_LOG_LEVEL"),
            "{cmd}: {text}"
        );
    }
}

#[tokio::test]
async fn replays_are_journaled_with_who_asked_and_how() {
    let app = spawn_app().await;
    app.post_json(&json!({"transaction_id": "WHO-1"})).await;
    app.drain_until_terminal(&["WHO-1"]).await;

    // Through the API: the admin token's configured name.
    let r = app
        .admin_post(
            "/v1/transactions/WHO-1/replay",
            Some(json!({"force": true, "reason": "api test"})),
        )
        .await;
    assert_eq!(r.status(), 202);
    app.drain_until_terminal(&["WHO-1"]).await;
    // From the command line: --operator, else $USER, marked as such.
    let out = rtpd()
        .args([
            "replay", "WHO-1", "--vendor", "acme", "--force", "--reason", "cli test",
        ])
        .env("RTPD_DATA_DIR", app.data_dir())
        .env("USER", "carol")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let journal = crate::support::process::read_journal(app.data_dir());
    let actor_of = |reason: &str| {
        journal
            .iter()
            .find(|e| {
                e["kind"] == "replay" && e["reason"].as_str().is_some_and(|r| r.contains(reason))
            })
            .map(|e| e["actor"].clone())
            .unwrap_or_else(|| panic!("no replay entry for {reason}: {journal:?}"))
    };
    assert_eq!(actor_of("api test"), "api:ops");
    assert_eq!(actor_of("cli test"), "cli:carol");
}
