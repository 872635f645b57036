//! The ledger contract, written once and run against every ledger adapter.

use chrono::DateTime;
use chrono::Utc;
use rtp_durability::ledger::{
    ClaimOutcome, Ledger, LedgerError, ListQuery, RegisterOutcome, ReplayOutcome,
};
use rtp_durability::transaction::{
    DeadLetterReason, Registration, Settlement, State, TransactionId, TxRecord,
    machine::{self, ClaimDecision},
};
use std::{collections::BTreeSet, sync::Arc, time::Duration};

fn reg(id: &str, sha: &str) -> Registration {
    Registration {
        transaction_id: TransactionId::parse(id).unwrap(),
        sha256: sha.into(),
        wal_ref: format!("wal/v1/2026/01/01/00/s.ndjson#0+{}", id.len())
            .parse()
            .unwrap(),
        vendor: Some("acme".into()),
        received_at: Utc::now(),
        expires_at: None,
    }
}

const LEASE: Duration = Duration::from_secs(30);

pub async fn register_new_duplicate_conflict(l: Arc<dyn Ledger>) {
    let RegisterOutcome::New(rec) = l.register(reg("t1", "aa")).await.unwrap() else {
        panic!("first registration is new")
    };
    assert_eq!(rec.status, State::Pending);
    assert_eq!(rec.vendor.as_deref(), Some("acme"));
    assert!(matches!(
        l.register(reg("t1", "aa")).await.unwrap(),
        RegisterOutcome::Duplicate(_)
    ));
    let RegisterOutcome::Conflict(existing) = l.register(reg("t1", "bb")).await.unwrap() else {
        panic!("other content is a conflict")
    };
    assert_eq!(existing.sha256, "aa", "never overwritten");
    assert_eq!(l.get("t1").await.unwrap().unwrap().sha256, "aa");
    assert!(l.get("nope").await.unwrap().is_none());
    l.ping().await.unwrap();
}

/// `get_first` answers the first of the ids the ledger holds, in the order
/// given: a vendor-scoped key before the bare id of an older entry.
pub async fn get_first_takes_the_ids_in_order(l: Arc<dyn Ledger>) {
    assert!(l.get_first(&["acme/g1", "g1"]).await.unwrap().is_none());
    l.register(reg("g1", "aa")).await.unwrap();
    let r = l.get_first(&["acme/g1", "g1"]).await.unwrap().unwrap();
    assert_eq!(r.transaction_id, "g1");
    let mut scoped = reg("g1", "bb");
    scoped.transaction_id = TransactionId::parse_key("acme/g1").unwrap();
    l.register(scoped).await.unwrap();
    let r = l.get_first(&["acme/g1", "g1"]).await.unwrap().unwrap();
    assert_eq!(r.transaction_id, "acme/g1");
    assert_eq!(r.sha256.as_str(), "bb");
    let r = l.get_first(&["g1", "acme/g1"]).await.unwrap().unwrap();
    assert_eq!(r.transaction_id, "g1");
    assert!(l.get_first(&[]).await.unwrap().is_none());
    // A key holding a vendor's full-length id (64 + 1 + 128 characters).
    let long = format!("{}/{}", "v".repeat(64), "i".repeat(128));
    let mut reg_long = reg("g2", "cc");
    reg_long.transaction_id = TransactionId::parse_key(&long).unwrap();
    l.register(reg_long).await.unwrap();
    assert_eq!(l.get(&long).await.unwrap().unwrap().transaction_id, long);
}

pub async fn claim_fences_and_settles(l: Arc<dyn Ledger>) {
    l.register(reg("t2", "aa")).await.unwrap();
    let ClaimOutcome::Claimed(c) = l.claim("t2", "w1", LEASE).await.unwrap() else {
        panic!("claimable")
    };
    assert_eq!(c.attempts, 1);
    assert_eq!(c.status, State::Processing);
    assert!(matches!(
        l.claim("t2", "w2", LEASE).await.unwrap(),
        ClaimOutcome::Busy(_)
    ));
    // A stranger's settle is refused and changes nothing.
    let err = l
        .settle("t2", "w2", 1, Settlement::Success)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Fenced { .. }), "{err:?}");
    assert_eq!(
        l.get("t2").await.unwrap().unwrap().status,
        State::Processing
    );
    let done = l.settle("t2", "w1", 1, Settlement::Success).await.unwrap();
    assert_eq!(done.status, State::Success);
    assert!(matches!(
        l.claim("t2", "w3", LEASE).await.unwrap(),
        ClaimOutcome::Terminal(_)
    ));
    assert!(matches!(
        l.claim("missing", "w", LEASE).await.unwrap(),
        ClaimOutcome::NotFound
    ));
}

pub async fn expired_lease_is_taken_over_and_old_owner_fenced(l: Arc<dyn Ledger>) {
    l.register(reg("t3", "aa")).await.unwrap();
    assert!(matches!(
        l.claim("t3", "w1", Duration::from_millis(200))
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ClaimOutcome::Claimed(c) = l.claim("t3", "w2", LEASE).await.unwrap() else {
        panic!("expired lease can be taken over")
    };
    assert_eq!(c.attempts, 2, "the fencing token grows");
    assert!(matches!(
        l.settle("t3", "w1", 1, Settlement::Success).await,
        Err(LedgerError::Fenced { .. })
    ));
    l.settle("t3", "w2", 2, Settlement::Success).await.unwrap();
}

/// `extend_lease` keeps a claim its holder still works on: past the end of
/// the lease it claimed with, the extension is what keeps others out. It
/// never shortens a lease, and a stranger or a stale attempt changes nothing.
pub async fn extend_lease_keeps_a_held_claim(l: Arc<dyn Ledger>) {
    l.register(reg("e1", "aa")).await.unwrap();
    let short = Duration::from_millis(300);
    let ClaimOutcome::Claimed(c) = l.claim("e1", "w1", short).await.unwrap() else {
        panic!("claimable")
    };
    let sent = Utc::now();
    let e = l.extend_lease("e1", "w1", 1, LEASE).await.unwrap();
    let until = e.lease_until.unwrap();
    assert!(until > c.lease_until.unwrap(), "{e:?}");
    assert!(
        until >= sent + chrono::Duration::from_std(LEASE).unwrap() - chrono::Duration::seconds(1),
        "{e:?}"
    );
    let mut want = c.clone();
    want.lease_until = e.lease_until;
    assert_eq!(
        e, want,
        "only the lease moves (not the state, attempt or updated_at)"
    );
    assert_eq!(l.get("e1").await.unwrap(), Some(e.clone()));

    tokio::time::sleep(short * 2).await;
    assert!(
        matches!(
            l.claim("e1", "w2", LEASE).await.unwrap(),
            ClaimOutcome::Busy(_)
        ),
        "the first lease has ended; the extension keeps the claim"
    );
    let again = l
        .extend_lease("e1", "w1", 1, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(again.lease_until, e.lease_until, "never shortened");

    for (owner, attempt) in [("w2", 1), ("w1", 2), ("w1", 0)] {
        let err = l
            .extend_lease("e1", owner, attempt, LEASE)
            .await
            .unwrap_err();
        assert!(
            matches!(err, LedgerError::Fenced { .. }),
            "{owner} {attempt}: {err:?}"
        );
    }
    assert_eq!(
        l.get("e1").await.unwrap(),
        Some(e),
        "fenced changes nothing"
    );
    assert!(matches!(
        l.extend_lease("missing", "w1", 1, LEASE).await,
        Err(LedgerError::NotFound(_))
    ));

    // Settled: nothing left to extend.
    l.settle("e1", "w1", 1, Settlement::Success).await.unwrap();
    assert!(matches!(
        l.extend_lease("e1", "w1", 1, LEASE).await,
        Err(LedgerError::Fenced { .. })
    ));
    assert_eq!(l.get("e1").await.unwrap().unwrap().status, State::Success);
}

/// A claim given back before any call (`release`) leaves the transaction
/// `pending` and due, with the attempt out of the retry budget
/// (`attempt_base` one up) and its number kept; a claim its holder no
/// longer holds is fenced, and a released claim cannot be extended,
/// settled or released again.
pub async fn release_gives_a_claim_back(l: Arc<dyn Ledger>) {
    l.register(reg("rl1", "aa")).await.unwrap();
    let ClaimOutcome::Claimed(c) = l.claim("rl1", "w1", LEASE).await.unwrap() else {
        panic!("claimed")
    };
    assert_eq!((c.attempts, c.attempt_base), (1, 0));
    assert!(matches!(
        l.release("rl1", "w2", 1).await,
        Err(LedgerError::Fenced { .. })
    ));
    assert!(matches!(
        l.release("rl1", "w1", 2).await,
        Err(LedgerError::Fenced { .. })
    ));
    let r = l.release("rl1", "w1", 1).await.unwrap();
    assert_eq!(
        (r.status, r.attempts, r.attempt_base, r.lease_owner.clone()),
        (State::Pending, 1, 1, None)
    );
    assert_eq!(r.lease_until, None);
    assert_eq!(r.next_retry_at, None);
    assert_eq!(l.get("rl1").await.unwrap(), Some(r));
    let counts = l.counts().await.unwrap();
    assert_eq!((counts.pending, counts.processing), (1, 0));
    for e in [
        l.release("rl1", "w1", 1).await.map(|_| ()),
        l.extend_lease("rl1", "w1", 1, LEASE).await.map(|_| ()),
        l.settle("rl1", "w1", 1, Settlement::Success)
            .await
            .map(|_| ()),
    ] {
        assert!(matches!(e, Err(LedgerError::Fenced { .. })), "{e:?}");
    }
    // Due at once: the next claim is attempt 2, counted from the new base.
    let ClaimOutcome::Claimed(c) = l.claim("rl1", "w2", LEASE).await.unwrap() else {
        panic!("a released claim's transaction is due at once")
    };
    assert_eq!((c.attempts, c.attempt_base), (2, 1));
    // A failed retry's claim given back: the retry count stays.
    l.settle(
        "rl1",
        "w2",
        2,
        Settlement::Failed {
            error: "503".into(),
            next_retry_at: chrono::Utc::now(),
        },
    )
    .await
    .unwrap();
    let ClaimOutcome::Claimed(c) = l.claim("rl1", "w3", LEASE).await.unwrap() else {
        panic!("the retry is due")
    };
    let r = l.release("rl1", "w3", c.attempts).await.unwrap();
    assert_eq!(
        (r.status, r.attempts, r.attempt_base, r.retry_count),
        (State::Pending, 3, 2, 1)
    );
    assert!(matches!(
        l.release("missing", "w1", 1).await,
        Err(LedgerError::NotFound(_))
    ));
}

/// Once another attempt has taken the transaction over (or an operator has
/// replayed it), the old holder's extension fails and steals nothing. A lapsed
/// lease nobody took over is still the holder's: no other attempt started.
pub async fn extend_lease_after_a_takeover_is_fenced(l: Arc<dyn Ledger>) {
    let short = Duration::from_millis(200);
    l.register(reg("e2", "aa")).await.unwrap();
    assert!(matches!(
        l.claim("e2", "w1", short).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    tokio::time::sleep(short * 2).await;
    let ClaimOutcome::Claimed(taken) = l.claim("e2", "w2", LEASE).await.unwrap() else {
        panic!("an expired lease can be taken over")
    };
    assert_eq!(taken.attempts, 2);
    let err = l.extend_lease("e2", "w1", 1, LEASE).await.unwrap_err();
    assert!(matches!(err, LedgerError::Fenced { .. }), "{err:?}");
    assert_eq!(
        l.get("e2").await.unwrap(),
        Some(taken.clone()),
        "the new holder keeps its claim and its lease"
    );
    assert!(matches!(
        l.settle("e2", "w1", 1, Settlement::Success).await,
        Err(LedgerError::Fenced { .. })
    ));
    l.extend_lease("e2", "w2", 2, LEASE).await.unwrap();
    l.settle("e2", "w2", 2, Settlement::Success).await.unwrap();

    // Lapsed, not taken over: the extension keeps it, and others wait.
    l.register(reg("e3", "aa")).await.unwrap();
    assert!(matches!(
        l.claim("e3", "w1", short).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    tokio::time::sleep(short * 2).await;
    l.extend_lease("e3", "w1", 1, LEASE).await.unwrap();
    assert!(matches!(
        l.claim("e3", "w2", LEASE).await.unwrap(),
        ClaimOutcome::Busy(_)
    ));

    // Replayed after its lease lapsed: the old attempt extends nothing.
    l.register(reg("e4", "aa")).await.unwrap();
    assert!(matches!(
        l.claim("e4", "w1", short).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    tokio::time::sleep(short * 2).await;
    assert!(matches!(
        l.replay("e4", "n", false, Duration::ZERO).await.unwrap(),
        ReplayOutcome::Reset(_)
    ));
    assert!(matches!(
        l.extend_lease("e4", "w1", 1, LEASE).await,
        Err(LedgerError::Fenced { .. })
    ));
    assert_eq!(l.get("e4").await.unwrap().unwrap().status, State::Pending);
}

pub async fn failed_retry_is_not_due_early(l: Arc<dyn Ledger>) {
    l.register(reg("t4", "aa")).await.unwrap();
    l.claim("t4", "w", LEASE).await.unwrap();
    let at = Utc::now() + chrono::Duration::milliseconds(500);
    let f = l
        .settle(
            "t4",
            "w",
            1,
            Settlement::Failed {
                error: "503".into(),
                next_retry_at: at,
            },
        )
        .await
        .unwrap();
    assert_eq!(f.status, State::Failed);
    assert_eq!(f.retry_count, 1);
    assert_eq!(f.error_message.as_deref(), Some("503"));
    assert!(matches!(
        l.claim("t4", "w", LEASE).await.unwrap(),
        ClaimOutcome::NotDue(_)
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let ClaimOutcome::Claimed(c) = l.claim("t4", "w", LEASE).await.unwrap() else {
        panic!("due retry is claimable")
    };
    assert_eq!(c.attempts, 2);
    let d = l
        .settle(
            "t4",
            "w",
            2,
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "400".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(d.status, State::DeadLetter);
}

pub async fn replay_rules(l: Arc<dyn Ledger>) {
    l.register(reg("t5", "aa")).await.unwrap();
    l.claim("t5", "w", LEASE).await.unwrap();
    l.settle(
        "t5",
        "w",
        1,
        Settlement::DeadLetter {
            reason: DeadLetterReason::PermanentFailure,
            error: "400".into(),
        },
    )
    .await
    .unwrap();
    let ReplayOutcome::Reset(r) = l.replay("t5", "n1", false, Duration::ZERO).await.unwrap() else {
        panic!("dead letters replay without force")
    };
    assert_eq!(r.status, State::Pending);
    assert_eq!(r.replay_nonce.as_deref(), Some("n1"));
    // A replay grants a fresh retry budget: retries count from attempt 1 on.
    assert_eq!((r.attempts, r.attempt_base, r.retry_count), (1, 1, 0));
    assert_eq!(l.get("t5").await.unwrap().unwrap().attempt_base, 1);
    let ClaimOutcome::Claimed(c) = l.claim("t5", "w", LEASE).await.unwrap() else {
        panic!("a replayed record is claimable")
    };
    assert_eq!(
        (c.attempts, c.attempt_base),
        (2, 1),
        "the fencing token keeps growing"
    );
    l.settle("t5", "w", 2, Settlement::Success).await.unwrap();
    assert!(matches!(
        l.replay("t5", "n2", false, Duration::ZERO).await.unwrap(),
        ReplayOutcome::Refused(_)
    ));
    assert!(matches!(
        l.replay("t5", "n3", true, Duration::ZERO).await.unwrap(),
        ReplayOutcome::Reset(_)
    ));
    assert!(matches!(
        l.replay("zz", "n", true, Duration::ZERO).await.unwrap(),
        ReplayOutcome::NotFound
    ));
}

/// Simulation seed 804: an attempt timed out at the processor and was
/// settled `failed`; an operator replay a moment later made it due at once,
/// and the next attempt started while the downstream still worked on the
/// timed-out one. A replay grants a fresh budget, but the transaction is not
/// due before `quiet` after its last failed or dead-lettered attempt ended
/// (nor after a retry scheduled sooner); after a success, at once.
pub async fn a_replay_waits_out_the_last_attempts_call(l: Arc<dyn Ledger>) {
    const QUIET: Duration = Duration::from_millis(600);
    let quiet = chrono::Duration::from_std(QUIET).unwrap();
    l.register(reg("t6", "aa")).await.unwrap();
    l.claim("t6", "w", LEASE).await.unwrap();
    let failed = l
        .settle(
            "t6",
            "w",
            1,
            Settlement::Failed {
                error: "timed out".into(),
                next_retry_at: Utc::now() + chrono::Duration::seconds(60),
            },
        )
        .await
        .unwrap();
    let ReplayOutcome::Reset(r) = l.replay("t6", "n1", false, QUIET).await.unwrap() else {
        panic!("a failed transaction replays without force")
    };
    assert_eq!(r.status, State::Pending);
    assert_eq!((r.attempt_base, r.retry_count), (1, 0), "a fresh budget");
    assert_eq!(
        r.next_retry_at,
        Some(failed.updated_at + quiet),
        "due once the timed-out call can have ended, not after the backoff"
    );
    assert!(
        matches!(
            l.claim("t6", "w", LEASE).await.unwrap(),
            ClaimOutcome::NotDue(_)
        ),
        "the replayed copy waits for it"
    );
    // A second replay while it waits keeps the time.
    let ReplayOutcome::Reset(again) = l.replay("t6", "n2", false, QUIET).await.unwrap() else {
        panic!("a pending transaction replays")
    };
    assert_eq!(again.next_retry_at, r.next_retry_at);
    tokio::time::sleep(QUIET + Duration::from_millis(200)).await;
    let ClaimOutcome::Claimed(c) = l.claim("t6", "w", LEASE).await.unwrap() else {
        panic!("due after the quiet time")
    };
    assert_eq!(c.attempts, 2);
    // A dead letter (retries ran out on a timeout): the same wait.
    let dead = l
        .settle(
            "t6",
            "w",
            2,
            Settlement::DeadLetter {
                reason: DeadLetterReason::RetriesExhausted,
                error: "timed out".into(),
            },
        )
        .await
        .unwrap();
    let ReplayOutcome::Reset(r) = l.replay("t6", "n3", false, QUIET).await.unwrap() else {
        panic!("dead letters replay")
    };
    assert_eq!(r.next_retry_at, Some(dead.updated_at + quiet));
    assert!(matches!(
        l.claim("t6", "w", LEASE).await.unwrap(),
        ClaimOutcome::NotDue(_)
    ));
    tokio::time::sleep(QUIET + Duration::from_millis(200)).await;
    let ClaimOutcome::Claimed(c) = l.claim("t6", "w", LEASE).await.unwrap() else {
        panic!("due after the quiet time")
    };
    // A success answered: a forced replay is due at once.
    l.settle("t6", "w", c.attempts, Settlement::Success)
        .await
        .unwrap();
    let ReplayOutcome::Reset(r) = l.replay("t6", "n4", true, QUIET).await.unwrap() else {
        panic!("a forced replay of a success")
    };
    assert_eq!(r.next_retry_at, None);
    assert!(matches!(
        l.claim("t6", "w", LEASE).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

pub async fn list_pages_by_state(l: Arc<dyn Ledger>) {
    for i in 0..25 {
        l.register(reg(&format!("p{i:02}"), "aa")).await.unwrap();
    }
    for i in 0..5 {
        let id = format!("p{i:02}");
        l.claim(&id, "w", LEASE).await.unwrap();
        l.settle(&id, "w", 1, Settlement::Success).await.unwrap();
    }
    let mut seen = BTreeSet::new();
    let mut cursor = None;
    loop {
        let page = l
            .list(ListQuery {
                state: Some(State::Pending),
                limit: 7,
                cursor: cursor.clone(),
            })
            .await
            .unwrap();
        assert!(page.items.len() <= 7);
        for r in &page.items {
            assert_eq!(r.status, State::Pending);
            assert!(seen.insert(r.transaction_id.clone()), "no item twice");
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 20);
    let ok = l
        .list(ListQuery {
            state: Some(State::Success),
            limit: 100,
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(ok.items.len(), 5);
    assert!(ok.next_cursor.is_none());
    let all = l
        .list(ListQuery {
            state: None,
            limit: 100,
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(all.items.len(), 25);
    assert!(
        all.items
            .windows(2)
            .all(|w| w[0].updated_at >= w[1].updated_at),
        "newest first"
    );
}

pub async fn counts_follow_transitions(l: Arc<dyn Ledger>) {
    let before = l.counts().await.unwrap();
    assert_eq!(before.total(), 0);
    for i in 0..6 {
        l.register(reg(&format!("c{i}"), "aa")).await.unwrap();
    }
    l.register(reg("c0", "aa")).await.unwrap(); // duplicate: no change
    l.claim("c0", "w", LEASE).await.unwrap();
    l.claim("c1", "w", LEASE).await.unwrap();
    l.settle("c1", "w", 1, Settlement::Success).await.unwrap();
    l.claim("c2", "w", LEASE).await.unwrap();
    l.settle(
        "c2",
        "w",
        1,
        Settlement::DeadLetter {
            reason: DeadLetterReason::PermanentFailure,
            error: "x".into(),
        },
    )
    .await
    .unwrap();
    l.claim("c3", "w", LEASE).await.unwrap();
    l.settle(
        "c3",
        "w",
        1,
        Settlement::Failed {
            error: "x".into(),
            next_retry_at: Utc::now(),
        },
    )
    .await
    .unwrap();
    let c = l.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.processing, c.success, c.failed, c.dead_letter),
        (2, 1, 1, 1, 1)
    );
    assert_eq!(c.total(), 6);
}

/// `oldest_update` is the least recent `updated_at` of the records in a state,
/// and follows them as they move on.
pub async fn oldest_update_follows_the_state(l: Arc<dyn Ledger>) {
    assert_eq!(l.oldest_update(State::Pending).await.unwrap(), None);
    let us = |r: &TxRecord| r.updated_at.timestamp_micros();
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp_micros());
    for id in ["o1", "o2", "o3"] {
        l.register(reg(id, "aa")).await.unwrap();
    }
    let recs = futures::future::join_all(["o1", "o2", "o3"].map(|id| l.get(id))).await;
    let recs: Vec<TxRecord> = recs.into_iter().map(|r| r.unwrap().unwrap()).collect();
    let oldest = recs.iter().map(us).min();
    assert_eq!(at(l.oldest_update(State::Pending).await.unwrap()), oldest);
    // The oldest leaves pending: the next oldest is reported.
    let first = recs
        .iter()
        .min_by_key(|r| (us(r), r.transaction_id.to_string()))
        .unwrap();
    let ClaimOutcome::Claimed(claimed) = l
        .claim(first.transaction_id.as_str(), "w", LEASE)
        .await
        .unwrap()
    else {
        panic!("claimable")
    };
    let rest: Vec<&TxRecord> = recs
        .iter()
        .filter(|r| r.transaction_id != first.transaction_id)
        .collect();
    assert_eq!(
        at(l.oldest_update(State::Pending).await.unwrap()),
        rest.iter().map(|r| us(r)).min()
    );
    assert_eq!(
        at(l.oldest_update(State::Processing).await.unwrap()),
        Some(us(&claimed))
    );
    for r in rest {
        let id = r.transaction_id.as_str();
        l.claim(id, "w", LEASE).await.unwrap();
        l.settle(id, "w", 1, Settlement::Success).await.unwrap();
    }
    assert_eq!(l.oldest_update(State::Pending).await.unwrap(), None);
    assert_eq!(l.oldest_update(State::DeadLetter).await.unwrap(), None);
    assert!(l.oldest_update(State::Success).await.unwrap().is_some());
}

/// Many claimers race for one transaction: exactly one wins.
pub async fn concurrent_claimers_one_wins(l: Arc<dyn Ledger>) {
    l.register(reg("race", "aa")).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let l = l.clone();
        tasks.spawn(async move { l.claim("race", &format!("w{w}"), LEASE).await.unwrap() });
    }
    let mut wins = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r.unwrap(), ClaimOutcome::Claimed(_)) {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(l.get("race").await.unwrap().unwrap().attempts, 1);
}

/// Counts stay exact while many transactions move concurrently.
pub async fn counts_exact_under_concurrency(l: Arc<dyn Ledger>) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let l = l.clone();
        tasks.spawn(async move {
            let id = format!("cc{i}");
            l.register(reg(&id, "aa")).await.unwrap();
            l.register(reg(&id, "aa")).await.unwrap();
            if i % 3 == 0 {
                return;
            }
            if let ClaimOutcome::Claimed(c) = l.claim(&id, "w", LEASE).await.unwrap() {
                let s = if i % 3 == 1 {
                    Settlement::Success
                } else {
                    Settlement::DeadLetter {
                        reason: DeadLetterReason::PermanentFailure,
                        error: "e".into(),
                    }
                };
                l.settle(&id, "w", c.attempts, s).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let c = l.counts().await.unwrap();
    assert_eq!(
        (c.pending, c.processing, c.success, c.dead_letter, c.failed),
        (20, 0, 20, 20, 0)
    );
}

pub async fn restore_replaces(l: Arc<dyn Ledger>) {
    let RegisterOutcome::New(mut rec) = l.register(reg("rs", "aa")).await.unwrap() else {
        panic!()
    };
    rec.status = State::Success;
    rec.attempts = 3;
    l.restore(rec.clone()).await.unwrap();
    let got = l.get("rs").await.unwrap().unwrap();
    assert_eq!(got.status, State::Success);
    assert_eq!(got.attempts, 3);
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.success), (0, 1));
}

/// Issue 12 item 8: a repair computed from an earlier read is put only if
/// nothing changed the record since — not over a claim, a settle or an
/// operator replay that came in between, and not for an absent id.
pub async fn restore_if_unchanged_never_overwrites_a_newer_state(l: Arc<dyn Ledger>) {
    let RegisterOutcome::New(_) = l.register(reg("ru", "aa")).await.unwrap() else {
        panic!()
    };
    let ClaimOutcome::Claimed(_) = l.claim("ru", "w1", LEASE).await.unwrap() else {
        panic!("claimable")
    };
    let seen = l.get("ru").await.unwrap().unwrap();
    let mut repair = seen.clone();
    repair.status = State::Success;
    repair.lease_owner = None;
    repair.lease_until = None;

    // An operator replay between the read and the repair (after the claim's
    // lease ran out, so the replay is allowed; here: settle, then replay).
    l.settle(
        "ru",
        "w1",
        seen.attempts,
        Settlement::Failed {
            error: "503".into(),
            next_retry_at: Utc::now(),
        },
    )
    .await
    .unwrap();
    let ReplayOutcome::Reset(replayed) =
        l.replay("ru", "n-1", false, Duration::ZERO).await.unwrap()
    else {
        panic!("replayable")
    };
    assert!(
        !l.restore_if_unchanged(&seen, repair.clone()).await.unwrap(),
        "the record changed since it was read"
    );
    let got = l.get("ru").await.unwrap().unwrap();
    assert_eq!(got.status, State::Pending);
    assert_eq!(got.replay_nonce.as_deref(), Some("n-1"));

    // Read again: now the repair goes in, and the counts move with it.
    let seen = l.get("ru").await.unwrap().unwrap();
    assert_eq!(seen.replay_nonce, replayed.replay_nonce);
    let mut repair = seen.clone();
    repair.status = State::Success;
    repair.attempts = seen.attempts + 2;
    assert!(l.restore_if_unchanged(&seen, repair).await.unwrap());
    let got = l.get("ru").await.unwrap().unwrap();
    assert_eq!(
        (got.status, got.attempts),
        (State::Success, seen.attempts + 2)
    );
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.processing, c.success), (0, 0, 1));

    // A second repair from the same (now stale) read is refused.
    let mut again = seen.clone();
    again.status = State::DeadLetter;
    assert!(!l.restore_if_unchanged(&seen, again).await.unwrap());
    assert_eq!(l.get("ru").await.unwrap().unwrap().status, State::Success);

    // A claim in between (same state before and after a lease takeover is
    // still another version: attempt and owner change).
    let RegisterOutcome::New(_) = l.register(reg("ru2", "aa")).await.unwrap() else {
        panic!()
    };
    let seen = l.get("ru2").await.unwrap().unwrap();
    let ClaimOutcome::Claimed(_) = l.claim("ru2", "w2", LEASE).await.unwrap() else {
        panic!("claimable")
    };
    let mut repair = seen.clone();
    repair.status = State::Failed;
    assert!(!l.restore_if_unchanged(&seen, repair).await.unwrap());
    assert_eq!(
        l.get("ru2").await.unwrap().unwrap().status,
        State::Processing
    );

    // An absent id is not the version read.
    let mut gone = seen.clone();
    gone.transaction_id = TransactionId::parse("ru-absent").unwrap();
    assert!(!l.restore_if_unchanged(&gone, gone.clone()).await.unwrap());
    assert!(l.get("ru-absent").await.unwrap().is_none());
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.processing, c.success), (0, 1, 1));
}

pub async fn restore_missing_never_overwrites(l: Arc<dyn Ledger>) {
    let RegisterOutcome::New(mut rec) = l.register(reg("rm", "aa")).await.unwrap() else {
        panic!()
    };
    rec.status = State::Success;
    assert!(!l.restore_missing(rec.clone()).await.unwrap());
    assert_eq!(l.get("rm").await.unwrap().unwrap().status, State::Pending);
    rec.transaction_id = TransactionId::parse("rm2").unwrap();
    assert!(l.restore_missing(rec).await.unwrap());
    assert_eq!(l.get("rm2").await.unwrap().unwrap().status, State::Success);
    let c = l.counts().await.unwrap();
    assert_eq!((c.pending, c.success), (1, 1));
}

pub async fn lease_has_one_holder(l: Arc<dyn Ledger>) {
    let ttl = std::time::Duration::from_millis(300);
    assert!(l.try_lease("recon", "a", ttl).await.unwrap());
    assert!(!l.try_lease("recon", "b", ttl).await.unwrap());
    // The holder renews; another name is independent.
    assert!(l.try_lease("recon", "a", ttl).await.unwrap());
    assert!(l.try_lease("other", "b", ttl).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(l.try_lease("recon", "b", ttl).await.unwrap());
    assert!(!l.try_lease("recon", "a", ttl).await.unwrap());
}

pub async fn checkpoints_round_trip(l: Arc<dyn Ledger>) {
    assert_eq!(l.checkpoint("wm").await.unwrap(), None);
    l.set_checkpoint("wm", "one").await.unwrap();
    l.set_checkpoint("wm", "two").await.unwrap();
    assert_eq!(l.checkpoint("wm").await.unwrap().as_deref(), Some("two"));
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap()
}

/// Records in every state the machine distinguishes.
fn variants(now: DateTime<Utc>) -> Vec<(&'static str, TxRecord)> {
    let mut first = reg("x", "aa");
    first.received_at = micros(first.received_at);
    let base = TxRecord::new(&first, now);
    let later = now + chrono::Duration::seconds(60);
    let earlier = now - chrono::Duration::seconds(60);
    let with = |f: &dyn Fn(&mut TxRecord)| {
        let mut r = base.clone();
        r.attempts = 2;
        f(&mut r);
        r
    };
    vec![
        ("pending", base.clone()),
        (
            "processing-live",
            with(&|r| {
                r.status = State::Processing;
                r.lease_owner = Some("w1".into());
                r.lease_until = Some(later);
            }),
        ),
        (
            "processing-expired",
            with(&|r| {
                r.status = State::Processing;
                r.lease_owner = Some("w1".into());
                r.lease_until = Some(earlier);
            }),
        ),
        (
            "processing-no-lease",
            with(&|r| r.status = State::Processing),
        ),
        (
            "failed-not-due",
            with(&|r| {
                r.status = State::Failed;
                r.retry_count = 1;
                r.error_message = Some("503".into());
                r.next_retry_at = Some(later);
            }),
        ),
        (
            "failed-due",
            with(&|r| {
                r.status = State::Failed;
                r.retry_count = 1;
                r.next_retry_at = Some(earlier);
            }),
        ),
        ("failed-no-retry-at", with(&|r| r.status = State::Failed)),
        (
            // A replay of a failed retry keeps its backoff (issue 12, seed 804).
            "pending-not-due",
            with(&|r| r.next_retry_at = Some(later)),
        ),
        ("pending-due", with(&|r| r.next_retry_at = Some(earlier))),
        ("success", with(&|r| r.status = State::Success)),
        (
            "dead_letter",
            with(&|r| {
                r.status = State::DeadLetter;
                r.error_message = Some("400".into());
            }),
        ),
    ]
}

/// Puts `rec` under a fresh id and returns that id.
async fn put(l: &dyn Ledger, name: &str, n: usize, rec: &TxRecord) -> (String, TxRecord) {
    let mut rec = rec.clone();
    rec.transaction_id = TransactionId::parse(&format!("{name}-{n}")).unwrap();
    let sent = Utc::now();
    l.restore(rec.clone()).await.unwrap();
    let answered = Utc::now();
    let stored = l.get(&rec.transaction_id).await.unwrap().unwrap();
    // A due time still ahead may be kept on the ledger's own clock (Redis):
    // as far from its now as from the caller's, so later by no more than
    // the call took.
    if let (Some(got_at), Some(asked)) = (stored.next_retry_at, rec.next_retry_at)
        && asked > sent
    {
        assert!(
            got_at >= asked && got_at - asked <= answered - sent,
            "{name}: due {got_at}, asked {asked}"
        );
        rec.next_retry_at = Some(got_at);
    }
    assert_eq!(stored, rec);
    (rec.transaction_id.to_string(), rec)
}

/// Every claim, settle, lease extension and replay decides exactly as `transaction::machine`
/// does, from every state the machine distinguishes, and counts follow.
pub async fn decisions_follow_the_state_machine(l: Arc<dyn Ledger>) {
    let l = l.as_ref();
    let now = micros(Utc::now());
    let lease = Duration::from_secs(30);
    for (i, (name, rec)) in variants(now).into_iter().enumerate() {
        // claim
        let (id, before) = put(l, name, i * 10, &rec).await;
        let got = l.claim(&id, "w2", lease).await.unwrap();
        match (machine::decide_claim(&before, Utc::now()), got) {
            (ClaimDecision::Terminal, ClaimOutcome::Terminal(r))
            | (ClaimDecision::Busy, ClaimOutcome::Busy(r))
            | (ClaimDecision::NotDue, ClaimOutcome::NotDue(r)) => assert_eq!(r, before, "{name}"),
            (ClaimDecision::Claim { attempt }, ClaimOutcome::Claimed(r)) => {
                let mut want = before.clone();
                machine::apply_claim(&mut want, "w2", r.lease_until.unwrap(), r.updated_at);
                assert_eq!(r, want, "{name}");
                assert_eq!(r.attempts, attempt, "{name}");
                assert_eq!(l.get(&id).await.unwrap(), Some(want), "{name}");
            }
            (d, o) => panic!("{name}: machine says {d:?}, the ledger says {o:?}"),
        }

        // settle, by the owner of record and by a stranger
        for (j, s) in [
            Settlement::Success,
            Settlement::Failed {
                error: "e".into(),
                next_retry_at: now,
            },
            Settlement::DeadLetter {
                reason: DeadLetterReason::PermanentFailure,
                error: "d".into(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            for (k, (owner, attempt)) in [("w1", 2), ("w2", 2), ("w1", 3)].into_iter().enumerate() {
                let (id, before) = put(l, name, i * 10 + 1 + j * 3 + k, &rec).await;
                let sent = Utc::now();
                let got = l.settle(&id, owner, attempt, s.clone()).await;
                let answered = Utc::now();
                if machine::holds(&before, owner, attempt) {
                    let r = got.unwrap();
                    let mut want = before.clone();
                    machine::apply_settlement(&mut want, &s, r.updated_at);
                    // A ledger may keep the retry's time on its own clock
                    // (Redis): as far from its now as from the caller's, so
                    // later by no more than the call took.
                    if let (Some(got_at), Some(asked)) = (r.next_retry_at, want.next_retry_at) {
                        assert!(
                            got_at >= asked && got_at - asked <= answered - sent,
                            "{name} {s:?}: retry at {got_at}, asked {asked}"
                        );
                        want.next_retry_at = Some(got_at);
                    }
                    assert_eq!(r, want, "{name} {s:?}");
                    assert_eq!(l.get(&id).await.unwrap(), Some(want), "{name}");
                } else {
                    assert!(
                        matches!(got, Err(LedgerError::Fenced { .. })),
                        "{name}: {got:?}"
                    );
                    assert_eq!(
                        l.get(&id).await.unwrap(),
                        Some(before),
                        "fenced changes nothing"
                    );
                }
            }
        }

        // lease extension, by the owner of record and by a stranger
        for (k, (owner, attempt)) in [("w1", 2), ("w2", 2), ("w1", 3)].into_iter().enumerate() {
            let (id, before) = put(l, name, i * 10 + 200 + k, &rec).await;
            let sent = micros(Utc::now());
            let got = l.extend_lease(&id, owner, attempt, lease).await;
            if machine::holds(&before, owner, attempt) {
                let r = got.unwrap();
                let until = r.lease_until.unwrap();
                assert!(
                    until
                        >= sent + chrono::Duration::from_std(lease).unwrap()
                            - chrono::Duration::seconds(1),
                    "{name}: {r:?}"
                );
                assert!(
                    before.lease_until.is_none_or(|b| until >= b),
                    "{name}: shortened"
                );
                let mut want = before.clone();
                machine::apply_extension(&mut want, until);
                assert_eq!(r, want, "{name}");
                assert_eq!(l.get(&id).await.unwrap(), Some(want), "{name}");
            } else {
                assert!(
                    matches!(got, Err(LedgerError::Fenced { .. })),
                    "{name}: {got:?}"
                );
                assert_eq!(
                    l.get(&id).await.unwrap(),
                    Some(before),
                    "fenced changes nothing"
                );
            }
        }

        // replay, with and without force
        for (j, force) in [false, true].into_iter().enumerate() {
            let (id, before) = put(l, name, i * 10 + 100 + j, &rec).await;
            let quiet = Duration::from_secs(30);
            match l.replay(&id, "n", force, quiet).await.unwrap() {
                ReplayOutcome::Reset(r) => {
                    assert!(machine::may_replay(&before, force, Utc::now()), "{name}");
                    let mut want = before.clone();
                    machine::apply_replay(
                        &mut want,
                        "n",
                        r.updated_at,
                        chrono::Duration::from_std(quiet).unwrap(),
                    );
                    assert_eq!(r, want, "{name}");
                }
                ReplayOutcome::Refused(r) => {
                    assert!(!machine::may_replay(&before, force, Utc::now()), "{name}");
                    assert_eq!(r, before);
                }
                ReplayOutcome::NotFound => panic!("{name}: restored record not found"),
            }
        }
    }
    // Every transition kept the per-state counts equal to the records.
    let counts = l.counts().await.unwrap();
    let mut by_state = rtp_durability::ledger::Counts::default();
    let mut cursor = None;
    loop {
        let page = l
            .list(ListQuery {
                state: None,
                limit: 50,
                cursor,
            })
            .await
            .unwrap();
        for r in &page.items {
            *by_state.slot(r.status) += 1;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(counts, by_state);
}

macro_rules! ledger_contract {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn register_new_duplicate_conflict() {
                super::register_new_duplicate_conflict($make().await).await
            }
            #[tokio::test]
            async fn get_first_takes_the_ids_in_order() {
                super::get_first_takes_the_ids_in_order($make().await).await
            }
            #[tokio::test]
            async fn claim_fences_and_settles() {
                super::claim_fences_and_settles($make().await).await
            }
            #[tokio::test]
            async fn expired_lease_is_taken_over_and_old_owner_fenced() {
                super::expired_lease_is_taken_over_and_old_owner_fenced($make().await).await
            }
            #[tokio::test]
            async fn extend_lease_keeps_a_held_claim() {
                super::extend_lease_keeps_a_held_claim($make().await).await
            }
            #[tokio::test]
            async fn release_gives_a_claim_back() {
                super::release_gives_a_claim_back($make().await).await
            }
            #[tokio::test]
            async fn extend_lease_after_a_takeover_is_fenced() {
                super::extend_lease_after_a_takeover_is_fenced($make().await).await
            }
            #[tokio::test]
            async fn failed_retry_is_not_due_early() {
                super::failed_retry_is_not_due_early($make().await).await
            }
            #[tokio::test]
            async fn replay_rules() {
                super::replay_rules($make().await).await
            }
            #[tokio::test]
            async fn a_replay_waits_out_the_last_attempts_call() {
                super::a_replay_waits_out_the_last_attempts_call($make().await).await
            }
            #[tokio::test]
            async fn list_pages_by_state() {
                super::list_pages_by_state($make().await).await
            }
            #[tokio::test]
            async fn counts_follow_transitions() {
                super::counts_follow_transitions($make().await).await
            }
            #[tokio::test]
            async fn oldest_update_follows_the_state() {
                super::oldest_update_follows_the_state($make().await).await
            }
            #[tokio::test]
            async fn concurrent_claimers_one_wins() {
                super::concurrent_claimers_one_wins($make().await).await
            }
            #[tokio::test]
            async fn counts_exact_under_concurrency() {
                super::counts_exact_under_concurrency($make().await).await
            }
            #[tokio::test]
            async fn restore_replaces() {
                super::restore_replaces($make().await).await
            }
            #[tokio::test]
            async fn restore_if_unchanged_never_overwrites_a_newer_state() {
                super::restore_if_unchanged_never_overwrites_a_newer_state($make().await).await
            }
            #[tokio::test]
            async fn restore_missing_never_overwrites() {
                super::restore_missing_never_overwrites($make().await).await
            }
            #[tokio::test]
            async fn lease_has_one_holder() {
                super::lease_has_one_holder($make().await).await
            }
            #[tokio::test]
            async fn decisions_follow_the_state_machine() {
                super::decisions_follow_the_state_machine($make().await).await
            }
            #[tokio::test]
            async fn checkpoints_round_trip() {
                super::checkpoints_round_trip($make().await).await
            }
        }
    };
}

async fn local() -> Arc<dyn Ledger> {
    let dir = tempfile::tempdir().unwrap().keep();
    let l: Arc<dyn Ledger> =
        Arc::new(rtp_durability::ledger::local::LocalLedger::open(&dir.join("ledger.db")).unwrap());
    rtp_durability::ledger::mark_new(&*l).await.unwrap();
    l
}

ledger_contract!(local_ledger, local);

/// The simulation's ledger (`tests/sim`) behaves like the real ones.
async fn memory() -> Arc<dyn Ledger> {
    Arc::new(rtp_durability::ledger::memory::MemoryLedger::new())
}

ledger_contract!(memory_ledger, memory);

async fn redis() -> Arc<dyn Ledger> {
    use rtp_durability::ledger::redis::{DEFAULT_TIMEOUT, RedisLedger, RedisSettings};
    let l: Arc<dyn Ledger> = Arc::new(
        RedisLedger::connect(&RedisSettings {
            url: crate::support::redis_url().into(),
            key_prefix: crate::support::redis_key_prefix(),
            entra: false,
            client_id: None,
            retention: Some(Duration::from_secs(30 * 86_400)),
            timeout: DEFAULT_TIMEOUT,
        })
        .unwrap(),
    );
    rtp_durability::ledger::mark_new(&*l).await.unwrap();
    l
}

ledger_contract!(redis_ledger, redis);

async fn postgres() -> Arc<dyn Ledger> {
    Arc::new(crate::support::postgres::ledger(Some(Duration::from_secs(30 * 86_400))).await)
}

ledger_contract!(postgres_ledger, postgres);

#[tokio::test]
async fn local_ledger_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.db");
    {
        let l = rtp_durability::ledger::local::LocalLedger::open(&path).unwrap();
        rtp_durability::ledger::mark_new(&l).await.unwrap();
        l.register(reg("kept", "aa")).await.unwrap();
    }
    let l = rtp_durability::ledger::local::LocalLedger::open(&path).unwrap();
    assert_eq!(l.get("kept").await.unwrap().unwrap().status, State::Pending);
    assert_eq!(l.counts().await.unwrap().pending, 1);
}

/// Issue 12, N1: a ledger without its intact mark (new, or it lost its data)
/// refuses registrations, retryably; a rebuild's token marks it only while
/// it is still the rebuild in progress.
async fn unmarked_ledger_refuses_until_a_rebuild_marks_it(l: Arc<dyn Ledger>) {
    assert!(!l.intact().await.unwrap());
    let e = l.register(reg("n1-a", "aa")).await.unwrap_err();
    assert!(matches!(e, LedgerError::Lost(_)), "{e:?}");
    assert!(e.is_retryable(), "{e:?}");
    assert!(l.get("n1-a").await.unwrap().is_none(), "nothing written");
    assert_eq!(
        l.refused_while_lost(
            "n1-a",
            &[
                reg("n1-a", "aa").wal_ref.to_string(),
                "wal/v1/other#0+1".to_owned()
            ]
        )
        .await
        .unwrap(),
        vec![reg("n1-a", "aa").wal_ref.to_string()],
        "the refused WAL record is remembered"
    );
    // A second rebuild began after the first (or a loss took the first's token).
    l.begin_rebuild("first").await.unwrap();
    l.begin_rebuild("second").await.unwrap();
    assert!(!l.mark_intact("first").await.unwrap());
    assert!(!l.intact().await.unwrap());
    assert!(l.register(reg("n1-a", "aa")).await.is_err());
    assert!(l.mark_intact("second").await.unwrap());
    assert!(l.intact().await.unwrap());
    assert!(l.mark_intact("first").await.unwrap(), "already marked");
    assert!(matches!(
        l.register(reg("n1-a", "aa")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
}

#[tokio::test]
async fn local_ledger_unmarked_refuses_until_marked() {
    let dir = tempfile::tempdir().unwrap();
    let l = rtp_durability::ledger::local::LocalLedger::open(&dir.path().join("l.db")).unwrap();
    unmarked_ledger_refuses_until_a_rebuild_marks_it(Arc::new(l)).await;
}

#[tokio::test]
async fn memory_ledger_wiped_refuses_until_marked() {
    let l = rtp_durability::ledger::memory::MemoryLedger::new();
    assert!(l.intact().await.unwrap(), "new, with nothing before it");
    l.register(reg("n1-a", "aa")).await.unwrap();
    l.wipe();
    unmarked_ledger_refuses_until_a_rebuild_marks_it(Arc::new(l)).await;
}

#[tokio::test]
async fn redis_ledger_unmarked_refuses_until_marked_per_shard() {
    use rtp_durability::ledger::redis::{
        DEFAULT_TIMEOUT, RedisLedger, RedisSettings, SHARDS, shard_of,
    };
    let prefix = crate::support::redis_key_prefix();
    let l = RedisLedger::connect(&RedisSettings {
        url: crate::support::redis_url().into(),
        key_prefix: prefix.clone(),
        entra: false,
        client_id: None,
        retention: None,
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    let l: Arc<dyn Ledger> = Arc::new(l);
    unmarked_ledger_refuses_until_a_rebuild_marks_it(l.clone()).await;

    // One shard loses its data (a cluster node restarted empty): its ids
    // are refused, the other shards' are not, and the ledger is not intact.
    let lost = shard_of("n1-b");
    let other = (0..100)
        .map(|i| format!("n1-o{i}"))
        .find(|id| shard_of(id) != lost)
        .unwrap();
    assert!(lost < SHARDS);
    let mut conn = redis::Client::open(crate::support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{{{prefix}:s{lost}}}:intact"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!l.intact().await.unwrap());
    assert!(matches!(
        l.register(reg("n1-b", "bb")).await.unwrap_err(),
        LedgerError::Lost(_)
    ));
    assert!(matches!(
        l.register(reg(&other, "bb")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
    rtp_durability::ledger::mark_new(&*l).await.unwrap();
    assert!(matches!(
        l.register(reg("n1-b", "bb")).await.unwrap(),
        RegisterOutcome::New(_)
    ));
}
