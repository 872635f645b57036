//! The simulated payment service behind the processor's `Downstream` port.
//! It honours `Idempotency-Key` like a real one: a key it already executed
//! is answered 409 "already processed" and never executed twice. Its work
//! runs apart from the caller, so a caller that dies or times out does not
//! stop a payment that is already in progress.

use crate::faults::{Faults, Storm};
use crate::history::{Call, Recorder};
use bytes::Bytes;
use rtp_durability::downstream::{CallResult, Downstream, classify};
use rtp_durability::transaction::Sha256;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Keys {
    in_flight: BTreeMap<String, u32>,
    executed: BTreeMap<String, Sha256>,
}

#[derive(Clone)]
pub struct PaymentService {
    keys: Arc<Mutex<Keys>>,
    faults: Faults,
    rec: Recorder,
    /// The processor's client timeout (a hang outlasts it).
    pub timeout: Duration,
}

impl PaymentService {
    pub fn new(faults: Faults, rec: Recorder, timeout: Duration) -> PaymentService {
        PaymentService {
            keys: Default::default(),
            faults,
            rec,
            timeout,
        }
    }

    /// The answer the service gives; runs to the end even if the caller left.
    async fn serve(
        self,
        key: String,
        id: String,
        attempt: u32,
        payload: Bytes,
    ) -> (u16, Option<Duration>) {
        let sha = Sha256::of(&payload);
        let overlapped = {
            let mut k = self.keys.lock().unwrap();
            let n = k.in_flight.entry(key.clone()).or_default();
            *n += 1;
            *n > 1
        };
        let call = self.rec.call_started(Call {
            id,
            key: key.clone(),
            attempt,
            sha: sha.clone(),
            start: self.rec.now(),
            end: None,
            overlapped,
            executed: false,
        });
        let f = &self.faults;
        let (p_transient, p_permanent) = {
            let s = f.sw.lock().unwrap();
            if s.on {
                (s.p_transient, s.p_permanent)
            } else {
                (0.0, 0.0)
            }
        };
        let storm = f.storm();
        tokio::time::sleep(f.chance.ms(5, 400)).await;
        let (status, retry_after, executed) = match storm {
            Some(Storm::ServerErrors) => (503, None, false),
            Some(Storm::TooManyRequests) => {
                (429, Some(Duration::from_secs(f.chance.range(1, 5))), false)
            }
            Some(Storm::Hangs) => {
                // Holds the request past the caller's timeout, then gives up without paying.
                tokio::time::sleep(self.timeout + Duration::from_millis(500)).await;
                (504, None, false)
            }
            None if f.chance.p(p_transient) => (503, None, false),
            None if f.chance.p(p_permanent) => (422, None, false),
            None => {
                let mut k = self.keys.lock().unwrap();
                match k.executed.get(&key) {
                    Some(_) => (409, None, false),
                    None => {
                        k.executed.insert(key.clone(), sha);
                        (200, None, true)
                    }
                }
            }
        };
        *self.keys.lock().unwrap().in_flight.entry(key).or_default() -= 1;
        self.rec.call_ended(call, executed, &status.to_string());
        (status, retry_after)
    }
}

#[async_trait::async_trait]
impl Downstream for PaymentService {
    async fn call(&self, transaction_id: &str, attempt: u32, payload: Bytes) -> CallResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = self.clone();
        let (key, id) = (transaction_id.to_owned(), payload_id(&payload));
        let lost = {
            let s = self.faults.sw.lock().unwrap();
            s.on && self.faults.chance.p(s.p_answer_lost)
        };
        tokio::spawn(async move {
            let _ = tx.send(server.serve(key, id, attempt, payload).await);
        });
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(_)) if lost => CallResult::Transient {
                reason: "connection reset before the answer".into(),
                retry_after: None,
            },
            Ok(Ok((status, retry_after))) => classify(status, retry_after),
            _ => CallResult::Transient {
                reason: "downstream timed out".into(),
                retry_after: None,
            },
        }
    }

    fn describe(&self) -> String {
        "simulated payment service".into()
    }
}

/// The transaction id the payload itself names (to check the key against).
fn payload_id(payload: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("transaction_id")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}
