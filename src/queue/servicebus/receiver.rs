//! One peek-lock receiving link, owned by a task so that settling never waits
//! behind a receive that is waiting for messages.
//!
//! Credit is manual and bounded: each receive grants `max(max, prefetch)`,
//! so the broker never hands out (and starts lock clocks on) more than that.
//! Without prefetch, a receive that ends short drains the credit it left
//! (as the SDKs do), so no message is locked for a receiver that stopped
//! asking; messages that raced the drain are returned with the others.

use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::TerminalDeliveryState;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Delivery, Receiver};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// After the first message, wait this long for others already on the way.
const BATCH_LINGER: Duration = Duration::from_millis(20);
/// After a drain, wait this long for messages the service had already sent.
const DRAIN_LINGER: Duration = Duration::from_millis(50);

pub(super) type AmqpDelivery = Delivery<Body<Value>>;

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

async fn run(mut receiver: Receiver, mut commands: mpsc::Receiver<Command>, prefetch: u32) {
    let mut pending: Option<Pending> = None;
    // Deliveries that arrived between receives (prefetch, or a drain's race).
    let mut buffered: Vec<AmqpDelivery> = Vec::new();
    loop {
        let deadline = pending.as_ref().map(|p| p.deadline);
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Receive { max, wait, reply }) => {
                    let max = max.max(1);
                    if buffered.len() >= max {
                        let rest = buffered.split_off(max);
                        let _ = reply.send(Ok(std::mem::replace(&mut buffered, rest)));
                        continue;
                    }
                    let got = std::mem::take(&mut buffered);
                    let wanted = u32::try_from(max - got.len()).unwrap_or(u32::MAX);
                    if let Err(e) = receiver.set_credit(wanted.max(prefetch)).await {
                        let _ = reply.send(if got.is_empty() { Err(format!("granting credit: {e}")) } else { Ok(got) });
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
                        buffered.push(d);
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
                        let _ = p.reply.send(if p.got.is_empty() { Err(format!("receiving: {e}")) } else { Ok(p.got) });
                    }
                    break;
                }
            },
            _ = sleep_until(deadline), if pending.is_some() => {
                if let Some(mut p) = pending.take() {
                    if prefetch == 0 && p.got.len() < p.max {
                        let drained = drain(&mut receiver, &mut p.got).await;
                        if let Err(e) = drained {
                            let _ = p.reply.send(if p.got.is_empty() { Err(e) } else { Ok(p.got) });
                            break;
                        }
                    }
                    let _ = p.reply.send(Ok(p.got));
                }
            }
        }
    }
    // The connection may already be gone; do not let a dead peer hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
}

/// Take back the credit a short receive left. The service answers a drain
/// by using up the credit on messages it has, or by cancelling it; messages
/// that were already on the way are kept (here, or in the buffer for the
/// next receive if they come later than a short linger).
async fn drain(receiver: &mut Receiver, got: &mut Vec<AmqpDelivery>) -> Result<(), String> {
    receiver
        .drain()
        .await
        .map_err(|e| format!("draining credit: {e}"))?;
    let until = Instant::now() + DRAIN_LINGER;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, receiver.recv::<Body<Value>>()).await {
            Ok(Ok(d)) => got.push(d),
            Ok(Err(e)) => return Err(format!("receiving while draining: {e}")),
            Err(_) => return Ok(()),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
