//! What happened in one run, as the outside world saw it: the vendor's
//! requests and answers, the operators' replays, the faults, and every call
//! that reached the simulated payment service. The invariant check reads it.

use chrono::{DateTime, Utc};
use rtp_durability::transaction::Sha256;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What the vendor heard back for one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 202
    Accepted,
    /// 200
    Duplicate,
    /// 409
    Conflict,
    /// 503: a dependency was unavailable ("maybe accepted; re-POST the same bytes").
    Unavailable,
    /// 500: an error that does not say "maybe".
    Failed,
    /// The process died before answering.
    Unanswered,
    /// No process was up to take the connection: nothing was received.
    Refused,
}

impl Answer {
    pub fn is_ack(self) -> bool {
        matches!(self, Answer::Accepted | Answer::Duplicate)
    }
}

#[derive(Debug, Clone)]
pub struct Post {
    pub id: String,
    pub sha: Sha256,
    pub answer: Answer,
    /// Refused for a WAL failure, yet the WAL held this very record when
    /// the answer went out.
    pub durable_when_refused: bool,
}

#[derive(Debug, Clone)]
pub struct Replay {
    pub id: String,
    pub force: bool,
    /// When the operator asked ...
    pub at: DateTime<Utc>,
    /// ... and when the answer came: a forced replay asked while an attempt
    /// was in flight takes effect once it has ended, success or not.
    pub done: DateTime<Utc>,
    /// The replay was accepted (a copy was enqueued).
    pub requeued: bool,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    /// The Idempotency-Key it carried.
    pub key: String,
    pub attempt: u32,
    pub sha: Sha256,
    pub start: DateTime<Utc>,
    pub end: Option<DateTime<Utc>>,
    /// Another call with the same key was in flight at the service when this one arrived.
    pub overlapped: bool,
    /// The service executed the payment in this call.
    pub executed: bool,
}

#[derive(Default)]
pub struct History {
    pub lines: Vec<String>,
    pub posts: Vec<Post>,
    pub replays: Vec<Replay>,
    pub calls: Vec<Call>,
    /// Most queue messages seen at once for one transaction.
    pub max_copies: BTreeMap<String, usize>,
    pub faults: usize,
    /// Retry copies completed while their transaction was still `failed`
    /// (waiting for exactly that copy): (id, message id).
    pub retries_dropped: Vec<(String, String)>,
}

#[derive(Clone)]
pub struct Recorder {
    pub h: Arc<Mutex<History>>,
    pub start: DateTime<Utc>,
}

impl Recorder {
    pub fn new(start: DateTime<Utc>) -> Recorder {
        Recorder {
            h: Arc::new(Mutex::new(History::default())),
            start,
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        rtp_durability::clock::now()
    }

    fn stamp(&self) -> String {
        let ms = (self.now() - self.start).num_milliseconds();
        format!("{:>4}.{:03}", ms / 1000, ms % 1000)
    }

    pub fn line(&self, s: String) {
        let line = format!("{} {s}", self.stamp());
        self.h.lock().unwrap().lines.push(line);
    }

    /// A fault injected (counted).
    pub fn note(&self, s: String) {
        self.h.lock().unwrap().faults += 1;
        self.line(s);
    }

    pub fn post(&self, p: Post) {
        self.line(format!(
            "post {} {} -> {:?}{}",
            p.id,
            &p.sha.as_str()[..8],
            p.answer,
            if p.durable_when_refused {
                " (yet durable)"
            } else {
                ""
            }
        ));
        self.h.lock().unwrap().posts.push(p);
    }

    pub fn replay(&self, r: Replay) {
        self.line(format!(
            "replay {}{} -> {}",
            r.id,
            if r.force { " forced" } else { "" },
            if r.requeued {
                "requeued"
            } else {
                "not requeued"
            }
        ));
        self.h.lock().unwrap().replays.push(r);
    }

    /// Starts a call; returns its index.
    pub fn call_started(&self, c: Call) -> usize {
        self.line(format!(
            "call {} attempt {} {}{}",
            c.id,
            c.attempt,
            &c.sha.as_str()[..8],
            if c.overlapped { " OVERLAPS" } else { "" }
        ));
        let mut h = self.h.lock().unwrap();
        h.calls.push(c);
        h.calls.len() - 1
    }

    pub fn call_ended(&self, i: usize, executed: bool, answer: &str) {
        let now = self.now();
        let id = {
            let mut h = self.h.lock().unwrap();
            let c = &mut h.calls[i];
            c.end = Some(now);
            c.executed = executed;
            c.id.clone()
        };
        self.line(format!(
            "call {id} answered {answer}{}",
            if executed { " (executed)" } else { "" }
        ));
    }

    pub fn retry_dropped(&self, id: &str, message_id: &str) {
        self.line(format!(
            "retry copy {message_id} completed while {id} is failed"
        ));
        self.h
            .lock()
            .unwrap()
            .retries_dropped
            .push((id.to_owned(), message_id.to_owned()));
    }

    pub fn copies(&self, counts: BTreeMap<String, usize>) {
        let mut h = self.h.lock().unwrap();
        for (id, n) in counts {
            let e = h.max_copies.entry(id).or_default();
            *e = (*e).max(n);
        }
    }
}
