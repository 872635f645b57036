//! PostgreSQL-specific ledger behaviour beyond the shared contract: races
//! between separate pools (as between processes), counts exact under
//! concurrency against the rows themselves, migrations that can run twice
//! and at once, the seed's `messages` view, retention, a dead database as a
//! fast `Unavailable`, and the round trips a transaction costs.

use crate::support::postgres::{client, database_url, ledger, ledger_at, schema_url};
use crate::support::{AppOptions, json, spawn_app_with};
use chrono::Utc;
use rtp_durability::ledger::postgres::{DEFAULT_TIMEOUT, PostgresLedger, schema};
use rtp_durability::ledger::{
    ClaimOutcome, Counts, Ledger, LedgerError, RegisterOutcome, ReplayOutcome,
};
use rtp_durability::processor::Outcome;
use rtp_durability::transaction::{
    DeadLetterReason, Registration, Settlement, State, TransactionId,
};
use serde_json::json;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

const LEASE: Duration = Duration::from_secs(30);

fn reg(id: &str) -> Registration {
    Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: "aa".into(),
        wal_ref: "wal/v1/x#0+1".parse().unwrap(),
        vendor: Some("acme".into()),
        received_at: Utc::now(),
        expires_at: None,
    }
}

/// Several ledgers on one schema, each with its own pool: processes.
async fn processes(n: usize) -> (String, Vec<Arc<PostgresLedger>>) {
    let url = schema_url().await;
    let ledgers = (0..n).map(|_| Arc::new(ledger_at(&url, None))).collect();
    (url, ledgers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_in_separate_processes_exactly_one_wins() {
    let (_, ls) = processes(4).await;
    let ids: Vec<String> = (0..20).map(|i| format!("race-{i}")).collect();
    for id in &ids {
        ls[0].register(reg(id)).await.unwrap();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (p, l) in ls.iter().enumerate() {
        for w in 0..8 {
            let (l, ids) = (l.clone(), ids.clone());
            tasks.spawn(async move {
                let mut won = Vec::new();
                for id in &ids {
                    if let ClaimOutcome::Claimed(r) =
                        l.claim(id, &format!("p{p}-w{w}"), LEASE).await.unwrap()
                    {
                        assert_eq!(r.attempts, 1);
                        won.push(id.clone());
                    }
                }
                won
            });
        }
    }
    let mut winners = Vec::new();
    while let Some(r) = tasks.join_next().await {
        winners.extend(r.unwrap());
    }
    winners.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(winners, want, "every id claimed exactly once");
    for id in &ids {
        let r = ls[1].get(id).await.unwrap().unwrap();
        assert_eq!((r.status, r.attempts), (State::Processing, 1), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_owner_racing_the_takeover_is_fenced_or_first_never_both() {
    let (_, ls) = processes(2).await;
    for i in 0..30 {
        let id = format!("stale-{i}");
        ls[0].register(reg(&id)).await.unwrap();
        let ClaimOutcome::Claimed(first) = ls[0]
            .claim(&id, "old", Duration::from_millis(1))
            .await
            .unwrap()
        else {
            panic!("claimable")
        };
        tokio::time::sleep(Duration::from_millis(3)).await;
        // The old owner settles while a new owner takes over the expired lease.
        let (old, new) = (ls[0].clone(), ls[1].clone());
        let (a, b) = (id.clone(), id.clone());
        let settle = tokio::spawn(async move {
            old.settle(&a, "old", first.attempts, Settlement::Success)
                .await
        });
        let claim = tokio::spawn(async move { new.claim(&b, "new", LEASE).await.unwrap() });
        let (settled, claimed) = (settle.await.unwrap(), claim.await.unwrap());
        match (settled, claimed) {
            // The old owner was first: the transaction is done.
            (Ok(r), ClaimOutcome::Terminal(_)) => assert_eq!(r.status, State::Success),
            // The takeover was first: the old owner's outcome is refused.
            (Err(LedgerError::Fenced { .. }), ClaimOutcome::Claimed(r)) => {
                assert_eq!((r.attempts, r.lease_owner.as_deref()), (2, Some("new")))
            }
            (s, c) => panic!("{id}: settle {s:?} and claim {c:?} both won or both lost"),
        }
    }
}

/// Counts by state, computed the slow way, as an auditor would.
async fn counted_by_rows(url: &str) -> Counts {
    let mut c = Counts::default();
    for row in client(url)
        .await
        .query(
            "SELECT status, count(*) FROM transactions GROUP BY status",
            &[],
        )
        .await
        .unwrap()
    {
        let s: String = row.get(0);
        let n: i64 = row.get(1);
        *c.slot(State::parse(&s).unwrap()) = n as u64;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_stay_exact_under_concurrent_writers_in_separate_processes() {
    let (url, ls) = processes(3).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..240 {
        let l = ls[i % ls.len()].clone();
        let other = ls[(i + 1) % ls.len()].clone();
        tasks.spawn(async move {
            let id = format!("cx-{i}");
            l.register(reg(&id)).await.unwrap();
            // A concurrent duplicate from another process changes nothing.
            other.register(reg(&id)).await.unwrap();
            if i % 5 == 0 {
                return;
            }
            let ClaimOutcome::Claimed(c) = other.claim(&id, "w", LEASE).await.unwrap() else {
                panic!("{id}: claimable")
            };
            let s = match i % 5 {
                1 => Settlement::Success,
                2 => Settlement::DeadLetter {
                    reason: DeadLetterReason::PermanentFailure,
                    error: "e".into(),
                },
                3 => Settlement::Failed {
                    error: "503".into(),
                    next_retry_at: Utc::now(),
                },
                _ => return, // stays processing
            };
            l.settle(&id, "w", c.attempts, s).await.unwrap();
            if i % 10 == 2 {
                l.replay(&id, "n", false, std::time::Duration::ZERO)
                    .await
                    .unwrap(); // dead_letter -> pending
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let counts = ls[0].counts().await.unwrap();
    assert_eq!(counts, counted_by_rows(&url).await);
    assert_eq!(
        (
            counts.pending,
            counts.processing,
            counts.success,
            counts.failed,
            counts.dead_letter
        ),
        (48 + 24, 48, 48, 48, 24)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_to_run_at_once() {
    // Four processes starting together: each also migrates in the background
    // from the moment it connects, so eight runs race on an empty schema.
    let (url, ls) = processes(4).await;
    let runs = futures::future::join_all(ls.iter().map(|l| l.migrate())).await;
    let mut applied = 0;
    for r in runs {
        let r = r.unwrap();
        assert_eq!(r.version, schema::latest());
        applied += r.applied.len();
    }
    assert!(
        applied <= schema::MIGRATIONS.len(),
        "applied twice: {applied}"
    );
    ls[0].register(reg("kept")).await.unwrap();
    // Again, later: nothing to do, nothing lost.
    let again = ls[1].migrate().await.unwrap();
    assert!(again.applied.is_empty());
    assert_eq!(
        ls[2].get("kept").await.unwrap().unwrap().status,
        State::Pending
    );
    assert_eq!(ls[3].counts().await.unwrap().pending, 1);
    let rows = client(&url)
        .await
        .query(
            "SELECT version FROM rtpd_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, (1..=schema::latest()).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_seed_messages_view_answers_the_seeds_queries() {
    let url = schema_url().await;
    let l = ledger_at(&url, None);
    for id in ["m-ok", "m-retry", "m-dead", "m-new"] {
        l.register(reg(id)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await; // distinct created_at
    }
    let past = Utc::now() - chrono::Duration::seconds(5);
    for (id, s) in [
        ("m-ok", Settlement::Success),
        (
            "m-retry",
            Settlement::Failed {
                error: "503 Service Unavailable".into(),
                next_retry_at: past,
            },
        ),
        (
            "m-dead",
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "400 Bad Request".into(),
            },
        ),
    ] {
        l.claim(id, "w", LEASE).await.unwrap();
        l.settle(id, "w", 1, s).await.unwrap();
    }
    let c = client(&url).await;
    // The seed's troubleshooting query, verbatim.
    let rows = c
        .query(
            "SELECT transaction_id, status, error_message FROM messages ORDER BY created_at DESC LIMIT 10;",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        [
            ("m-new".into(), "pending".into(), None),
            (
                "m-dead".into(),
                "dead_letter".into(),
                Some("400 Bad Request".into())
            ),
            (
                "m-retry".into(),
                "failed".into(),
                Some("503 Service Unavailable".into())
            ),
            ("m-ok".into(), "success".into(), None),
        ]
    );
    // The seed's retry worker: failed messages whose retry is due.
    let due = c
        .query(
            "SELECT transaction_id, retry_count FROM messages \
             WHERE status = 'failed' AND next_retry_at <= NOW() ORDER BY next_retry_at",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].get::<_, String>(0), "m-retry");
    assert_eq!(due[0].get::<_, i32>(1), 1);
    // Every seed column is there, with the seed's names; the payload is not
    // copied into the ledger (the WAL has it).
    let all = c
        .query(
            "SELECT transaction_id, payload IS NULL, status, retry_count, error_message, \
                    next_retry_at, created_at, updated_at FROM messages WHERE transaction_id = 'm-ok'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert!(all[0].get::<_, bool>(1), "no payload copy");
    // The seed's metrics, by status.
    let by_status = c
        .query(
            "SELECT status, COUNT(*) FROM messages GROUP BY status ORDER BY status",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(by_status.len(), 4);
}

#[tokio::test]
async fn retention_deletes_expired_terminal_records_in_batches_and_counts_follow() {
    let retention = Duration::from_millis(600);
    let l = ledger(Some(retention)).await;
    for id in [
        "gone-ok",
        "gone-dl",
        "kept-replayed",
        "kept-pending",
        "kept-failed",
    ] {
        l.register(reg(id)).await.unwrap();
    }
    for (id, s) in [
        ("gone-ok", Settlement::Success),
        (
            "gone-dl",
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "x".into(),
            },
        ),
        (
            "kept-replayed",
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "x".into(),
            },
        ),
        (
            "kept-failed",
            Settlement::Failed {
                error: "x".into(),
                next_retry_at: Utc::now(),
            },
        ),
    ] {
        l.claim(id, "w", LEASE).await.unwrap();
        l.settle(id, "w", 1, s).await.unwrap();
    }
    l.replay("kept-replayed", "n", false, std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        l.purge_expired().await.unwrap(),
        0,
        "nothing is old enough yet"
    );

    tokio::time::sleep(retention + Duration::from_millis(300)).await;
    assert_eq!(l.purge_expired().await.unwrap(), 2);
    assert!(l.get("gone-ok").await.unwrap().is_none());
    assert!(l.get("gone-dl").await.unwrap().is_none());
    for id in ["kept-replayed", "kept-pending", "kept-failed"] {
        assert!(l.get(id).await.unwrap().is_some(), "{id}");
    }
    let c = l.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.processing, c.success, c.failed, c.dead_letter),
        (2, 0, 0, 1, 0)
    );
    // Past the dedup window the id is new again (the WAL keeps the old one).
    assert!(matches!(
        l.register(reg("gone-ok")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
    assert_eq!(l.counts().await.unwrap().pending, 3);
}

#[tokio::test]
async fn a_dead_postgres_is_a_fast_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let l = ledger_at(&format!("postgresql://postgres@127.0.0.1:{port}/x"), None);
    let started = Instant::now();
    let e = l.ping().await.unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e:?}");
    let e = l.register(reg("x")).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let e = l.get("x").await.unwrap_err();
    assert!(matches!(e, LedgerError::Unavailable(_)), "{e:?}");
    assert!(
        started.elapsed() < DEFAULT_TIMEOUT * 3 + Duration::from_millis(500),
        "each call is bounded: {:?}",
        started.elapsed()
    );
}

/// Ingest (`get` + `register`) and processing (`claim` + `settle`) through
/// the real intake and processor: top-level statements per transaction, as
/// pg_stat_statements counts them in a database of this test alone. Each is
/// one round trip: the pool prepares a statement once per connection.
#[tokio::test]
async fn a_transaction_costs_at_most_four_round_trips() {
    let (url, db) = database_url().await;
    let app = spawn_app_with(AppOptions {
        tweak: Some(Box::new(move |s| {
            s.ledger = rtp_durability::config::LedgerKind::Postgres;
            s.postgres_url = Some(url.as_str().into());
            s.ledger_retention_days = 0; // no background deletes during the count
        })),
        ..Default::default()
    })
    .await;
    let admin = client(&crate::support::postgres::url()).await;
    let calls = || async {
        let row = admin
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
                 WHERE toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
                &[&db],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    // Warm up: migrations, and every statement prepared on the connections.
    let post = |id: String| {
        let app = &app;
        async move {
            let r = app
                .post_json(&json!({ "transaction_id": id, "amount": "1.00" }))
                .await;
            assert_eq!(r.status(), 202, "{}", json(r).await);
        }
    };
    post("warm-0".into()).await;
    let warm = app
        .processor
        .try_process_next(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(warm, Outcome::Succeeded), "{warm:?}");
    let before = calls().await;
    const N: i64 = 50;
    for i in 0..N {
        post(format!("rt-{i}")).await;
    }
    let mut done = 0;
    while done < N {
        match app
            .processor
            .try_process_next(Duration::from_secs(5))
            .await
            .unwrap()
        {
            Outcome::Succeeded => done += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    let per_tx = (calls().await - before) as f64 / N as f64;
    println!("postgres ledger: {per_tx:.2} statements (round trips) per transaction");
    assert!(per_tx <= 4.0, "{per_tx} round trips per transaction");
    assert!(per_tx >= 4.0, "the count sees every call: {per_tx}");
    assert_eq!(
        app.services.ledger.counts().await.unwrap().success as i64,
        N + 1
    );
}

#[tokio::test]
async fn the_messages_view_shows_the_payload_only_when_configured() {
    for keep in [false, true] {
        let url = schema_url().await;
        let ledger_url = url.clone();
        let app = spawn_app_with(AppOptions {
            tweak: Some(Box::new(move |s| {
                s.ledger = rtp_durability::config::LedgerKind::Postgres;
                s.postgres_url = Some(ledger_url.as_str().into());
                s.postgres_payload = keep;
            })),
            ..Default::default()
        })
        .await;
        let body =
            json!({ "transaction_id": "with-payload", "amount": "12.50", "currency": "EUR" });
        assert_eq!(app.post_json(&body).await.status(), 202);
        let row = client(&url)
            .await
            .query_one(
                "SELECT payload::text FROM messages WHERE transaction_id = 'acme/with-payload'",
                &[],
            )
            .await
            .unwrap();
        let payload: Option<String> = row.get(0);
        match keep {
            false => assert_eq!(payload, None, "the WAL holds it; no second copy"),
            true => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&payload.unwrap()).unwrap(),
                body
            ),
        }
    }
}

#[tokio::test]
async fn truncating_the_table_zeroes_the_counts() {
    let url = schema_url().await;
    let l = ledger_at(&url, None);
    for id in ["tr-1", "tr-2"] {
        l.register(reg(id)).await.unwrap();
    }
    l.claim("tr-1", "w", LEASE).await.unwrap();
    assert_eq!(l.counts().await.unwrap().total(), 2);
    client(&url)
        .await
        .batch_execute("TRUNCATE transactions")
        .await
        .unwrap();
    assert_eq!(l.counts().await.unwrap(), Counts::default());
    l.register(reg("tr-1")).await.unwrap();
    assert_eq!(l.counts().await.unwrap().pending, 1);
}

#[tokio::test]
async fn rtpd_migrate_applies_once_then_reports_nothing_to_do() {
    let url = schema_url().await;
    let migrate = || {
        crate::support::process::rtpd()
            .arg("migrate")
            .env("RTPD_LEDGER", "postgres")
            .env("RTPD_POSTGRES_URL", &url)
            .env("RTPD_LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let first = migrate();
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let all: Vec<i32> = (1..=schema::latest()).collect();
    assert!(out.contains(&format!("applied {all:?}")), "{out}");
    let again = migrate();
    let out = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success());
    assert!(out.contains("nothing to apply"), "{out}");
    // Without a PostgreSQL ledger there is nothing to migrate: exit 1, one line.
    let local = crate::support::process::rtpd()
        .arg("migrate")
        .env("RTPD_LEDGER", "local")
        .output()
        .unwrap();
    assert_eq!(local.status.code(), Some(1));
    let err = String::from_utf8_lossy(&local.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("RTPD_LEDGER"), "{err}");
}

/// A replay whose UPDATE outlives the client's timeout (a row lock held by
/// another session, a slow server) can still commit afterwards. The
/// replayer then reads the record back to learn whether the replay took,
/// and journals a withdraw when it did not (issue 12, N2). The read-back
/// (`Ledger::replay_fate`) must be final: once it answers without the
/// replay's nonce, that replay never takes effect later. Before, it was a
/// plain read that did not wait for the blocked UPDATE, which committed
/// after it, so the ledger held a replay the journal had withdrawn.
#[tokio::test]
async fn a_replay_answered_as_not_taken_never_takes_later() {
    use rtp_durability::ledger::postgres::{DEFAULT_POOL_SIZE, PostgresSettings};
    let url = schema_url().await;
    let l = PostgresLedger::connect(&PostgresSettings {
        url: url.clone().into(),
        entra: false,
        client_id: None,
        retention: None,
        timeout: Duration::from_millis(300),
        pool_size: DEFAULT_POOL_SIZE,
        payload: false,
    })
    .unwrap();
    rtp_durability::ledger::mark_new(&l).await.unwrap();
    l.register(reg("pf-1")).await.unwrap();
    let ClaimOutcome::Claimed(c) = l
        .claim("pf-1", "w1", Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("claimed")
    };
    l.settle(
        "pf-1",
        "w1",
        c.attempts,
        Settlement::DeadLetter {
            reason: DeadLetterReason::PermanentFailure,
            error: "400".into(),
        },
    )
    .await
    .unwrap();

    // Several pooled connections, so the read-back does not simply queue
    // behind the replay on the same one (the pool hands out another).
    for r in futures::future::join_all((0..4).map(|_| l.get("pf-1"))).await {
        r.unwrap();
    }
    // Another session holds the row: the replay's UPDATE waits past the
    // client's timeout and stays queued at the server.
    let mut locker = client(&url).await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM transactions WHERE transaction_id = 'pf-1' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let e = l
        .replay("pf-1", "n1", false, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let fate = async {
        // As the replayer does: tried again while it does not answer.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match l.replay_fate("pf-1", "n1").await {
                Ok(r) => return r.unwrap(),
                Err(e) => assert!(Instant::now() < deadline, "{e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let release = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.commit().await.unwrap();
    };
    let (seen, ()) = tokio::join!(fate, release);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = l.get("pf-1").await.unwrap().unwrap();
    assert_eq!(
        seen.replay_nonce, now.replay_nonce,
        "the read-back said {:?}, the ledger holds {:?} since",
        seen.replay_nonce, now.replay_nonce
    );
    assert_eq!(
        now.replay_nonce.as_deref(),
        Some("n1"),
        "the queued replay took first"
    );

    // A replay that reaches the server after its read-back said "not
    // taken" (sent, lost in the network, arriving late) does nothing.
    let r = l.replay_fate("pf-1", "n2").await.unwrap().unwrap();
    assert_eq!(r.replay_nonce.as_deref(), Some("n1"));
    let late = l.replay("pf-1", "n2", false, Duration::ZERO).await.unwrap();
    assert!(!matches!(late, ReplayOutcome::Reset(_)), "{late:?}");
    assert_eq!(
        l.get("pf-1")
            .await
            .unwrap()
            .unwrap()
            .replay_nonce
            .as_deref(),
        Some("n1")
    );
    // A later replay's fence does not lift the earlier one's (a reviewer's
    // probe: with one withdrawn nonce kept, n3's fence let n2 take).
    l.replay_fate("pf-1", "n3").await.unwrap().unwrap();
    for nonce in ["n2", "n3"] {
        let late = l
            .replay("pf-1", nonce, false, Duration::ZERO)
            .await
            .unwrap();
        assert!(
            !matches!(late, ReplayOutcome::Reset(_)),
            "{nonce}: {late:?}"
        );
    }
    let rec = l.get("pf-1").await.unwrap().unwrap();
    assert_eq!(rec.replay_nonce.as_deref(), Some("n1"));
    // A new replay goes through.
    let fresh = l.replay("pf-1", "n4", false, Duration::ZERO).await.unwrap();
    assert!(matches!(fresh, ReplayOutcome::Reset(_)), "{fresh:?}");
}
