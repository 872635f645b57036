//! One peek-lock receiving link, owned by a task so that settling never waits
//! behind a receive that is waiting for messages.
//!
//! Credit is manual and bounded: each receive grants `max(max, prefetch)`,
//! so the broker never hands out (and starts lock clocks on) more than that.
//! Without prefetch, a receive that ends short drains the credit it left
//! (as the SDKs do) and waits for the service's answer — the link's credit
//! at 0, by messages or by the service advancing the delivery count — before
//! it returns, so messages that raced the drain come back with the others
//! and the next grant of credit counts from the service's delivery count,
//! however long the round trip. A drain the service does not answer within
//! [`DRAIN_WAIT`] ends the link (the next receive attaches a new one).
//!
//! Messages that arrive between receives (prefetch) are kept at most
//! [`BUFFER_MAX_AGE`], then released, so a message is never handed to the
//! processor with a lock that ran out while it waited here; when the link
//! ends, buffered messages are released too.

use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::TerminalDeliveryState;
use fe2o3_amqp::types::messaging::{Body, Released};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Delivery, Receiver};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// After the first message, wait this long for others already on the way.
const BATCH_LINGER: Duration = Duration::from_millis(20);
/// How long a drain may wait for the service's answer before the link is given up.
pub(super) const DRAIN_WAIT: Duration = Duration::from_secs(30);
/// How often a drain looks at the link's credit while no message arrives
/// (`fe2o3-amqp` wakes no receiver for a flow frame).
const DRAIN_POLL: Duration = Duration::from_millis(2);
/// A message received between receives is released after this long: well
/// inside Service Bus's shortest lock (5 s), so none is handed over expired.
pub(super) const BUFFER_MAX_AGE: Duration = Duration::from_secs(2);

pub(super) type AmqpDelivery = Delivery<Body<Value>>;
type Received = Result<Vec<AmqpDelivery>, String>;
type Reply = oneshot::Sender<Received>;

enum Command {
    Receive {
        max: usize,
        wait: Duration,
        reply: oneshot::Sender<Result<Vec<AmqpDelivery>, String>>,
    },
    Settle {
        info: DeliveryInfo,
        state: TerminalDeliveryState,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Handle to a receiving link task. `generation` identifies the link: a
/// lock taken on one generation cannot be settled on another.
#[derive(Clone)]
pub(super) struct ReceiverLink {
    pub generation: u64,
    /// The link's name, for `associated-link-name` on lock operations.
    pub name: String,
    commands: mpsc::Sender<Command>,
}

impl ReceiverLink {
    pub fn spawn(receiver: Receiver, generation: u64, prefetch: u32) -> Self {
        let (commands, rx) = mpsc::channel(64);
        let name = receiver.name().to_string();
        tokio::spawn(run(receiver, rx, prefetch));
        Self {
            generation,
            name,
            commands,
        }
    }

    pub fn is_alive(&self) -> bool {
        !self.commands.is_closed()
    }

    pub async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<AmqpDelivery>, String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Receive { max, wait, reply })
            .await
            .map_err(|_| "receiving link is closed".to_string())?;
        rx.await
            .map_err(|_| "receiving link closed while receiving".to_string())?
    }

    pub async fn settle(
        &self,
        info: DeliveryInfo,
        state: TerminalDeliveryState,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Settle { info, state, reply })
            .await
            .map_err(|_| "receiving link is closed".to_string())?;
        rx.await
            .map_err(|_| "receiving link closed while settling".to_string())?
    }
}

struct Pending {
    max: usize,
    deadline: Instant,
    got: Vec<AmqpDelivery>,
    reply: oneshot::Sender<Result<Vec<AmqpDelivery>, String>>,
}

/// A message that arrived with no receive waiting, and when.
struct Buffered {
    at: Instant,
    delivery: AmqpDelivery,
}

async fn run(mut receiver: Receiver, mut commands: mpsc::Receiver<Command>, prefetch: u32) {
    let mut pending: Option<Pending> = None;
    // Deliveries that arrived between receives (prefetch).
    let mut buffered: Vec<Buffered> = Vec::new();
    // A receive the link failed under, answered once the link is closed (so
    // that what the caller does next, such as putting a token on `$cbs`, does
    // not race this link's detach on the session).
    let mut failed: Option<(Reply, Received)> = None;
    loop {
        let deadline = pending.as_ref().map(|p| p.deadline);
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Receive { max, wait, reply }) => {
                    let max = max.max(1);
                    if release_stale(&mut receiver, &mut buffered).await.is_err() {
                        let _ = reply.send(Err("receiving link failed releasing stale messages".into()));
                        break;
                    }
                    if buffered.len() >= max {
                        let rest = buffered.split_off(max);
                        let now = std::mem::replace(&mut buffered, rest);
                        let _ = reply.send(Ok(now.into_iter().map(|b| b.delivery).collect()));
                        continue;
                    }
                    let got: Vec<_> = std::mem::take(&mut buffered).into_iter().map(|b| b.delivery).collect();
                    let wanted = u32::try_from(max - got.len()).unwrap_or(u32::MAX);
                    if let Err(e) = receiver.set_credit(wanted.max(prefetch)).await {
                        failed = Some((reply, if got.is_empty() { Err(format!("granting credit: {e}")) } else { Ok(got) }));
                        break;
                    }
                    let wait = if got.is_empty() { wait } else { wait.min(BATCH_LINGER) };
                    pending = Some(Pending { max, deadline: Instant::now() + wait, got, reply });
                }
                Some(Command::Settle { info, state, reply }) => {
                    let result = receiver.dispose(info, state).await.map_err(|e| format!("settling: {e}"));
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    if failed {
                        break;
                    }
                }
            },
            // Always listening, so a detach by the service ends this task (and the
            // next settlement goes by lock token) even between receives.
            delivery = receiver.recv::<Body<Value>>() => match delivery {
                Ok(d) => {
                    let Some(p) = pending.as_mut() else {
                        buffered.push(Buffered { at: Instant::now(), delivery: d });
                        continue;
                    };
                    p.got.push(d);
                    if p.got.len() >= p.max {
                        if let Some(p) = pending.take() {
                            let _ = p.reply.send(Ok(p.got));
                        }
                    } else {
                        p.deadline = p.deadline.min(Instant::now() + BATCH_LINGER);
                    }
                }
                Err(e) => {
                    if let Some(p) = pending.take() {
                        // Messages already taken are still ours to report; their
                        // settlement goes by lock token once this link is gone.
                        failed = Some((p.reply, if p.got.is_empty() { Err(format!("receiving: {e}")) } else { Ok(p.got) }));
                    }
                    break;
                }
            },
            _ = sleep_until(deadline), if pending.is_some() => {
                if let Some(mut p) = pending.take() {
                    if prefetch == 0 && p.got.len() < p.max {
                        let drained = drain(&mut receiver, &mut p.got, DRAIN_WAIT).await;
                        if let Err(e) = drained {
                            failed = Some((p.reply, if p.got.is_empty() { Err(e) } else { Ok(p.got) }));
                            break;
                        }
                    }
                    let _ = p.reply.send(Ok(p.got));
                }
            }
        }
    }
    // Say at once that this link is gone, so the next receive attaches a new
    // one instead of queueing behind the close below.
    commands.close();
    while let Ok(command) = commands.try_recv() {
        match command {
            Command::Receive { reply, .. } => {
                let _ = reply.send(Err("receiving link is closed".into()));
            }
            Command::Settle { reply, .. } => {
                let _ = reply.send(Err("receiving link is closed".into()));
            }
        }
    }
    // Nobody will take what is buffered: give it back to the queue now rather
    // than at its lock's end (a gone link refuses, and the lock ends anyway).
    for b in buffered.drain(..) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            receiver.dispose(b.delivery.into_parts().0, released()),
        )
        .await;
    }
    // The connection may already be gone; do not let a dead peer hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
    if let Some((reply, result)) = failed {
        let _ = reply.send(result);
    }
}

fn released() -> TerminalDeliveryState {
    TerminalDeliveryState::Released(Released {})
}

/// Release buffered messages older than [`BUFFER_MAX_AGE`]: their locks may
/// be near their end, and the service hands them out again at once.
async fn release_stale(
    receiver: &mut Receiver,
    buffered: &mut Vec<Buffered>,
) -> Result<(), String> {
    let now = Instant::now();
    let (stale, fresh): (Vec<_>, Vec<_>) = std::mem::take(buffered)
        .into_iter()
        .partition(|b| now.saturating_duration_since(b.at) >= BUFFER_MAX_AGE);
    *buffered = fresh;
    for b in stale {
        tracing::debug!("releasing a prefetched message that waited too long");
        // The disposition only fails with the session; the lock ends anyway.
        receiver
            .dispose(b.delivery.into_parts().0, released())
            .await
            .map_err(|e| format!("releasing: {e}"))?;
    }
    Ok(())
}

/// Take back the credit a short receive left, and wait for the service's
/// answer: it uses the credit up on messages it has, or advances the
/// delivery count to cancel it; either way the link's credit reaches 0 and
/// every message sent before the answer has arrived (frames keep their
/// order), so all of them are returned now and none is locked for a
/// receiver that stopped asking. The next grant then counts from the
/// service's delivery count, so it is not eaten by a late answer.
async fn drain(
    receiver: &mut Receiver,
    got: &mut Vec<AmqpDelivery>,
    limit: Duration,
) -> Result<(), String> {
    receiver
        .drain()
        .await
        .map_err(|e| format!("draining credit: {e}"))?;
    let until = Instant::now() + limit;
    while receiver.credit() > 0 {
        if Instant::now() >= until {
            return Err(format!(
                "the service did not answer a drain within {limit:?}; leaving the link"
            ));
        }
        match tokio::time::timeout(DRAIN_POLL, receiver.recv::<Body<Value>>()).await {
            Ok(Ok(d)) => got.push(d),
            Ok(Err(e)) => return Err(format!("receiving while draining: {e}")),
            Err(_) => {}
        }
    }
    Ok(())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
