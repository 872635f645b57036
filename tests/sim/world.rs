//! One simulated run: the shared backends, the "processes" (tasks sharing an
//! owner id: intake, processor workers, background reconciler), the vendor
//! and operator workload and the fault schedule, all drawn from one seed and
//! run on tokio's paused clock in one thread.

use crate::check::{self, Violation};
use crate::downstream::PaymentService;
use crate::faults::{Chance, Faults, FaultyLedger, FaultyQueue, FaultyStore, Storm, Switches};
use crate::history::{Answer, Post, Recorder, Replay};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rtp_durability::backoff::RetryPolicy;
use rtp_durability::envelope::transaction_id_of;
use rtp_durability::intake::{Dependency, Intake, IntakeError, IntakeOutcome, Submission};
use rtp_durability::journal::Journal;
use rtp_durability::ledger::{Ledger, memory::MemoryLedger};
use rtp_durability::processor::{self, Processor};
use rtp_durability::queue::{
    Queue, Subqueue,
    memory::{MemoryQueue, MemoryQueueOptions},
};
use rtp_durability::reconcile::{self, Periodic, ReconcileOptions, Reconciler};
use rtp_durability::replay::{Operator, ReplayRequest, Replayed, Replayer};
use rtp_durability::transaction::{Sha256, State, TransactionId};
use rtp_durability::wal::{
    GroupCommit, JOURNAL_PREFIX, Log, Source, WAL_PREFIX, WalRecord, memory::MemoryStore,
    split_lines, store::ObjectStore,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Timing of the pipeline under simulation (short, so retries, leases and
/// re-drives all happen within a run).
pub const LOCK: Duration = Duration::from_secs(5);
pub const DOWNSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
pub const PENDING_AFTER: Duration = Duration::from_secs(15);
const MAX_RETRIES: u32 = 3;
const PROCESSES: usize = 2;
/// Faults happen during this phase; the quiescent phase follows.
const ACTIVE: Duration = Duration::from_secs(120);
const QUIET: Duration = Duration::from_secs(900);

/// What one seed's run produced.
pub struct RunResult {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub digest: String,
    pub transactions: usize,
    pub faults: usize,
    pub calls: usize,
    pub lines: Vec<String>,
}

/// The virtual clock is process-wide: under `cargo test` (tests as threads
/// of one process) runs take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs one seed to the end on a fresh single-threaded runtime with paused time.
pub fn run_seed(seed: u64) -> RunResult {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let r = rt.block_on(simulate(seed));
    rt.shutdown_background();
    r
}

struct Proc {
    incarnation: u32,
    tasks: JoinSet<()>,
    intake: Option<Intake>,
    replayer: Option<Replayer>,
}

struct World {
    chance: Chance,
    faults: Faults,
    rec: Recorder,
    ledger: Arc<dyn Ledger>,
    queue: Arc<dyn Queue>,
    store: Arc<dyn ObjectStore>,
    memory_ledger: Arc<MemoryLedger>,
    memory_queue: Arc<MemoryQueue>,
    memory_store: Arc<MemoryStore>,
    downstream: PaymentService,
    procs: Mutex<Vec<Proc>>,
}

fn pick_rate(c: &Chance, rates: &[f64]) -> f64 {
    c.pick(rates).unwrap_or(0.0)
}

async fn simulate(seed: u64) -> RunResult {
    let start: DateTime<Utc> = DateTime::parse_from_rfc3339("2030-01-01T00:58:30Z")
        .expect("a fixed start")
        .with_timezone(&Utc);
    rtp_durability::clock::simulate(start, seed);
    let origin = Instant::now();
    let rec = Recorder::new(start);
    let chance = Chance::new(seed);
    let sw = Switches {
        on: true,
        p_before: pick_rate(&chance, &[0.0, 0.01, 0.03]),
        p_after: pick_rate(&chance, &[0.0, 0.01, 0.03]),
        p_hang: pick_rate(&chance, &[0.0, 0.002]),
        p_delay: 0.3,
        max_delay_ms: chance.pick(&[5, 50, 400]).unwrap_or(5),
        p_put_conflict_after_landing: pick_rate(&chance, &[0.0, 0.0, 0.05]),
        ledger_down_until: None,
        storm: None,
        p_transient: pick_rate(&chance, &[0.05, 0.2, 0.4]),
        p_permanent: pick_rate(&chance, &[0.0, 0.03]),
        p_answer_lost: pick_rate(&chance, &[0.0, 0.03]),
    };
    let faults = Faults {
        chance: chance.clone(),
        sw: Arc::new(Mutex::new(sw)),
        hang: Duration::from_secs(2),
        log: rec.clone(),
    };
    let memory_ledger = Arc::new(MemoryLedger::new());
    let memory_queue = Arc::new(MemoryQueue::new(MemoryQueueOptions {
        lock_duration: LOCK,
        max_delivery_count: 10,
        duplicate_detection_window: Duration::from_secs(600),
    }));
    let memory_store = Arc::new(MemoryStore::new());
    let world = Arc::new(World {
        chance: chance.clone(),
        faults: faults.clone(),
        rec: rec.clone(),
        ledger: Arc::new(FaultyLedger {
            inner: memory_ledger.clone(),
            f: faults.clone(),
        }),
        queue: Arc::new(FaultyQueue {
            inner: memory_queue.clone(),
            f: faults.clone(),
            ledger: memory_ledger.clone(),
            memory: memory_queue.clone(),
        }),
        store: Arc::new(FaultyStore {
            inner: memory_store.clone(),
            f: faults.clone(),
        }),
        memory_ledger: memory_ledger.clone(),
        memory_queue: memory_queue.clone(),
        memory_store: memory_store.clone(),
        downstream: PaymentService::new(faults.clone(), rec.clone(), DOWNSTREAM_TIMEOUT),
        procs: Mutex::new(Vec::new()),
    });
    for i in 0..PROCESSES {
        world.procs.lock().unwrap().push(Proc {
            incarnation: 0,
            tasks: JoinSet::new(),
            intake: None,
            replayer: None,
        });
        world.start(i);
    }
    let mut background = JoinSet::new();
    {
        let w = world.clone();
        background.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for m in w.memory_queue.main_messages() {
                    if let Some(id) = transaction_id_of(&m) {
                        *counts.entry(id.to_owned()).or_default() += 1;
                    }
                }
                w.rec.copies(counts);
            }
        });
    }

    let transactions = chance.range(10, 40) as usize;
    let mut schedule = schedule(&chance, transactions);
    schedule.sort_by_key(|(at, _)| *at);
    for (at, action) in schedule {
        tokio::time::sleep_until(origin + at).await;
        world.clone().act(action, &mut background);
    }
    tokio::time::sleep_until(origin + ACTIVE).await;
    rec.line("quiescent phase: faults off, every process up".into());
    faults.off();
    memory_queue.set_scheduled_skew(Duration::ZERO);
    for i in 0..PROCESSES {
        if world.procs.lock().unwrap()[i].intake.is_none() {
            world.start(i);
        }
    }
    tokio::time::sleep_until(origin + ACTIVE + QUIET).await;
    for p in world.procs.lock().unwrap().iter_mut() {
        p.tasks.abort_all();
    }
    background.abort_all();

    let violations = check::check(
        &rec,
        &memory_ledger.snapshot(),
        memory_store.as_ref(),
        memory_queue.as_ref(),
    )
    .await;
    for v in &violations {
        rec.line(format!("VIOLATION {v}"));
    }
    let h = rec.h.lock().unwrap();
    RunResult {
        seed,
        violations,
        digest: Sha256::of(h.lines.join("\n").as_bytes()).to_string(),
        transactions,
        faults: h.faults,
        calls: h.calls.len(),
        lines: h.lines.clone(),
    }
}

#[derive(Debug, Clone)]
enum Action {
    Vendor(usize),
    Replay {
        tx: usize,
        force: bool,
    },
    Crash {
        proc: usize,
        down: Duration,
    },
    LedgerWipe {
        rebuild_after: Option<Duration>,
    },
    LedgerDown(Duration),
    Storm(Storm, Duration),
    LoseMessage,
    CopyMessage,
    PurgeQueue,
    /// The broker's clock runs ahead: scheduled messages come this early.
    QueueClockAhead(Duration),
}

fn schedule(c: &Chance, transactions: usize) -> Vec<(Duration, Action)> {
    let mut s = Vec::new();
    for i in 0..transactions {
        s.push((c.ms(0, 80_000), Action::Vendor(i)));
    }
    for _ in 0..c.range(0, 8) {
        let tx = c.range(0, transactions as u64 - 1) as usize;
        s.push((
            c.ms(5_000, 115_000),
            Action::Replay {
                tx,
                force: c.p(0.3),
            },
        ));
    }
    for _ in 0..c.range(2, 12) {
        let at = c.ms(1_000, 110_000);
        let a = match c.range(0, 10) {
            0 | 1 => Action::Crash {
                proc: c.range(0, PROCESSES as u64 - 1) as usize,
                down: c.ms(500, 12_000),
            },
            2 => Action::LedgerWipe {
                rebuild_after: c.p(0.5).then(|| c.ms(500, 8_000)),
            },
            3 => Action::LedgerDown(c.ms(500, 8_000)),
            4 => Action::Storm(
                c.pick(&[Storm::ServerErrors, Storm::TooManyRequests, Storm::Hangs])
                    .unwrap_or(Storm::ServerErrors),
                c.ms(1_000, 20_000),
            ),
            5 | 6 => Action::LoseMessage,
            7 | 8 => Action::CopyMessage,
            9 => Action::PurgeQueue,
            _ => Action::QueueClockAhead(c.ms(200, 3_000)),
        };
        s.push((at, a));
    }
    s
}

fn payload(id: &str, n: usize, variant: u32) -> Bytes {
    Bytes::from(format!(
        r#"{{"transaction_id":"{id}","amount":{},"currency":"USD","variant":{variant}}}"#,
        100 + n
    ))
}

impl World {
    fn start(self: &Arc<Self>, i: usize) {
        let mut procs = self.procs.lock().unwrap();
        let p = &mut procs[i];
        p.incarnation += 1;
        let instance = format!("p{i}.{}", p.incarnation);
        let gc = GroupCommit {
            max_records: 64,
            max_bytes: 1 << 20,
            flushers: 2,
            retry_deadline: Duration::from_secs(5),
        };
        let wal = Log::start(self.store.clone(), WAL_PREFIX, &instance, gc.clone());
        let journal = Journal::new(Log::start(
            self.store.clone(),
            JOURNAL_PREFIX,
            &instance,
            gc,
        ));
        // The process's own resend queue: lost with it on a crash, as in rtpd.
        let waiting = Arc::new(rtp_durability::recovery::Waiting::default());
        let resend = rtp_durability::resend::Resend::start(
            self.queue.clone(),
            waiting.clone(),
            rtp_durability::resend::CAPACITY,
        );
        p.intake = Some(Intake {
            wal: wal.clone(),
            journal: journal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            resend: Some(resend.clone()),
            ledger_lost: Default::default(),
        });
        p.replayer = Some(Replayer {
            wal: wal.clone(),
            journal: journal.clone(),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            quiet: LOCK + DOWNSTREAM_TIMEOUT,
        });
        let processor = Arc::new(Processor {
            queue: self.queue.clone(),
            ledger: self.ledger.clone(),
            journal: journal.clone(),
            downstream: Arc::new(self.downstream.clone()),
            policy: RetryPolicy {
                base: Duration::from_secs(2),
                max: Duration::from_secs(20),
                max_retries: MAX_RETRIES,
            },
            owner: instance.clone(),
            claim_names: Default::default(),
            lock_duration: LOCK,
            downstream_timeout: DOWNSTREAM_TIMEOUT,
            journal_index: Default::default(),
            resend,
            waiting,
            ledger_down: Default::default(),
            journal_read_hold: processor::JOURNAL_READ_HOLD,
        });
        let reconciler = Arc::new(Reconciler {
            wal,
            journal,
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            instance: instance.clone(),
            in_flight: LOCK + DOWNSTREAM_TIMEOUT,
        });
        // Never stopped gracefully: a process ends by crashing.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stopped2 = stopped.clone();
        p.tasks.spawn(async move {
            let _keep = stop;
            let _ = processor::run(processor, 2, stopped, Duration::from_secs(10)).await;
        });
        p.tasks.spawn(reconcile::run_periodically(
            reconciler,
            Periodic {
                interval: Duration::from_secs(5),
                lookback: Duration::from_secs(3600),
                pending_after: PENDING_AFTER,
                rate_per_sec: 0,
            },
            stopped2,
        ));
        drop(procs);
        self.rec.line(format!("process {instance} started"));
    }

    fn crash(&self, i: usize) {
        let mut procs = self.procs.lock().unwrap();
        let p = &mut procs[i];
        if p.intake.is_none() {
            return;
        }
        p.tasks.abort_all();
        p.intake = None;
        p.replayer = None;
        drop(procs);
        self.faults.log.note(format!("fault process p{i} crashed"));
    }

    /// A live process chosen by chance, with the tasks it runs requests in.
    fn live(&self) -> Option<usize> {
        let procs = self.procs.lock().unwrap();
        let up: Vec<usize> = (0..procs.len())
            .filter(|i| procs[*i].intake.is_some())
            .collect();
        drop(procs);
        self.chance.pick(&up)
    }

    /// One POST to a live process: the answer, or none if it died meanwhile.
    async fn post(self: &Arc<Self>, id: &str, bytes: Bytes) -> Answer {
        let sha = Sha256::of(&bytes);
        let sent_at = rtp_durability::clock::now();
        let mut wal_refused = false;
        let answer = match self.live() {
            None => Answer::Refused,
            Some(i) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                {
                    let mut procs = self.procs.lock().unwrap();
                    let p = &mut procs[i];
                    let intake = p.intake.clone().expect("live");
                    let s = Submission {
                        transaction_id: TransactionId::parse(id).expect("valid id"),
                        payload: bytes,
                        sha256: sha.clone(),
                        source: Source {
                            vendor: Some("acme".into()),
                            remote_addr: None,
                            kafka: None,
                        },
                        expires_at: None,
                    };
                    p.tasks.spawn(async move {
                        let _ = tx.send(intake.accept(s).await);
                    });
                }
                match rx.await {
                    Ok(Ok(IntakeOutcome::Accepted { .. })) => Answer::Accepted,
                    Ok(Ok(IntakeOutcome::Duplicate(_))) => Answer::Duplicate,
                    Ok(Ok(IntakeOutcome::Conflict(_))) => Answer::Conflict,
                    Ok(Err(IntakeError::Unavailable { dependency, .. })) => {
                        wal_refused = dependency == Dependency::Wal;
                        Answer::Unavailable
                    }
                    Ok(Err(e)) => {
                        wal_refused = matches!(e, IntakeError::Wal(_));
                        Answer::Failed
                    }
                    Err(_) => Answer::Unanswered,
                }
            }
        };
        let durable_when_refused = wal_refused && self.wal_holds(id, &sha, sent_at).await;
        self.rec.post(Post {
            id: id.to_owned(),
            sha,
            answer,
            durable_when_refused,
        });
        answer
    }

    /// Whether the WAL holds a record of `id` with `sha` received since `since`.
    async fn wal_holds(&self, id: &str, sha: &Sha256, since: DateTime<Utc>) -> bool {
        let store = &self.memory_store;
        for o in store
            .list(&format!("{WAL_PREFIX}/"))
            .await
            .unwrap_or_default()
        {
            let Ok(body) = store.get(&o.key).await else {
                continue;
            };
            for (_, line) in split_lines(&o.key, &body) {
                if let Ok(w) = serde_json::from_slice::<WalRecord>(&line)
                    && w.transaction_id == id
                    && w.sha256 == *sha
                    && w.received_at >= since
                {
                    return true;
                }
            }
        }
        false
    }

    /// A vendor: posts, re-posts after a failure (sometimes other bytes),
    /// sometimes repeats later with the same or other bytes.
    async fn vendor(self: Arc<Self>, n: usize) {
        let c = self.chance.clone();
        let id = format!("tx-{n:03}");
        let mut variant = 0;
        let mut answer = self.post(&id, payload(&id, n, variant)).await;
        for _ in 0..4 {
            if answer.is_ack() || answer == Answer::Conflict {
                break;
            }
            tokio::time::sleep(c.ms(500, 6_000)).await;
            if c.p(0.25) {
                variant += 1;
            }
            answer = self.post(&id, payload(&id, n, variant)).await;
        }
        if c.p(0.2) {
            tokio::time::sleep(c.ms(500, 30_000)).await;
            self.post(&id, payload(&id, n, variant)).await;
        }
        if c.p(0.1) {
            tokio::time::sleep(c.ms(500, 30_000)).await;
            self.post(&id, payload(&id, n, variant + 7)).await;
        }
        // Deadline expiries: `expires_at` is not on main yet (issue 12's
        // feature). When it lands, some vendors send one here and the check
        // asserts no call started after it.
    }

    async fn replay(self: Arc<Self>, n: usize, force: bool) {
        let id = format!("tx-{n:03}");
        let at = self.rec.now();
        let requeued = match self.live() {
            None => false,
            Some(i) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                {
                    let mut procs = self.procs.lock().unwrap();
                    let p = &mut procs[i];
                    let r = p.replayer.clone().expect("live");
                    let req = ReplayRequest {
                        force,
                        operator: Operator::Cli("sim".into()),
                        reason: None,
                        // A forced replay names the state the operator
                        // saw, as the API and the CLI require: `success`.
                        expect: force.then_some(State::Success),
                    };
                    let id = id.clone();
                    p.tasks.spawn(async move {
                        // The operator names the vendor's transaction by its key.
                        let key = format!("acme/{id}");
                        let _ = tx.send(r.replay_one(&key, &req).await);
                    });
                }
                matches!(rx.await, Ok(Ok(Replayed::Requeued { .. })))
            }
        };
        self.rec.replay(Replay {
            id,
            force,
            at,
            done: self.rec.now(),
            requeued,
        });
    }

    /// `rtpd rebuild-ledger` after a Redis loss: the reconciler's join with
    /// re-driving off, over everything.
    async fn rebuild(self: Arc<Self>) {
        let store = self.store.clone();
        let gc = GroupCommit::default();
        let r = Reconciler {
            wal: Log::start(store.clone(), WAL_PREFIX, "rebuild", gc.clone()),
            journal: Journal::new(Log::start(store, JOURNAL_PREFIX, "rebuild", gc)),
            ledger: self.ledger.clone(),
            queue: self.queue.clone(),
            instance: "rebuild".into(),
            in_flight: LOCK + DOWNSTREAM_TIMEOUT,
        };
        let now = rtp_durability::clock::now();
        let mut o = ReconcileOptions::new(now - chrono::Duration::hours(2), now, PENDING_AFTER);
        o.redrive = false;
        let result = r.rebuild(&o, Duration::ZERO).await;
        self.rec.line(format!(
            "operator rebuild-ledger: {}",
            match result {
                Ok((rep, marked)) => format!(
                    "{} records, complete {}, marked intact {marked}",
                    rep.records, rep.complete
                ),
                Err(e) => format!("failed: {e}"),
            }
        ));
    }

    fn act(self: Arc<Self>, a: Action, background: &mut JoinSet<()>) {
        let c = self.chance.clone();
        match a {
            Action::Vendor(n) => {
                background.spawn(self.vendor(n));
            }
            Action::Replay { tx, force } => {
                background.spawn(self.replay(tx, force));
            }
            Action::Crash { proc, down } => {
                self.crash(proc);
                background.spawn(async move {
                    tokio::time::sleep(down).await;
                    if self.faults.is_on() && self.procs.lock().unwrap()[proc].intake.is_none() {
                        self.start(proc);
                    }
                });
            }
            Action::LedgerWipe { rebuild_after } => {
                self.memory_ledger.wipe();
                self.faults
                    .log
                    .note("fault ledger wiped (Redis loss)".into());
                if let Some(d) = rebuild_after {
                    background.spawn(async move {
                        tokio::time::sleep(d).await;
                        self.rebuild().await;
                    });
                }
            }
            Action::LedgerDown(d) => {
                self.faults.sw.lock().unwrap().ledger_down_until = Some(Instant::now() + d);
                self.faults
                    .log
                    .note(format!("fault ledger unavailable for {d:?}"));
            }
            Action::Storm(kind, d) => {
                self.faults.sw.lock().unwrap().storm = Some((kind, Instant::now() + d));
                self.faults
                    .log
                    .note(format!("fault downstream {kind:?} for {d:?}"));
            }
            Action::LoseMessage => {
                if let Some(q) = c.pick(&self.memory_queue.main_sequence_numbers()) {
                    self.memory_queue.lose(q);
                    self.faults
                        .log
                        .note(format!("fault queue message {q} lost"));
                }
            }
            Action::CopyMessage => {
                if let Some(q) = c.pick(&self.memory_queue.main_sequence_numbers()) {
                    self.memory_queue.redeliver_copy(q);
                    self.faults
                        .log
                        .note(format!("fault queue message {q} delivered twice"));
                }
            }
            Action::QueueClockAhead(d) => {
                self.memory_queue.set_scheduled_skew(d);
                self.faults
                    .log
                    .note(format!("fault queue clock {d:?} ahead"));
            }
            Action::PurgeQueue => {
                let n = self.memory_queue.purge(Subqueue::Main);
                self.faults
                    .log
                    .note(format!("fault queue purged ({n} messages)"));
            }
        }
    }
}
