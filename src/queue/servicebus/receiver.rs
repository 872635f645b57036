//! One peek-lock receiving link, owned by a task so that settling never waits
//! behind a receive that is waiting for messages.
//!
//! Credit is manual and bounded: each receive grants `max(max, prefetch)`,
//! so the broker never hands out (and starts lock clocks on) more than that.

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
    commands: mpsc::Sender<Command>,
}

impl ReceiverLink {
    pub fn spawn(receiver: Receiver, generation: u64, prefetch: u32) -> Self {
        let (commands, rx) = mpsc::channel(64);
        tokio::spawn(run(receiver, rx, prefetch));
        Self {
            generation,
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
    loop {
        let deadline = pending.as_ref().map(|p| p.deadline);
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Receive { max, wait, reply }) => {
                    let max = max.max(1);
                    let credit = u32::try_from(max).unwrap_or(u32::MAX).max(prefetch);
                    if let Err(e) = receiver.set_credit(credit).await {
                        let _ = reply.send(Err(format!("granting credit: {e}")));
                        break;
                    }
                    pending = Some(Pending { max, deadline: Instant::now() + wait, got: Vec::new(), reply });
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
            delivery = receiver.recv::<Body<Value>>(), if pending.is_some() => {
                let Some(p) = pending.as_mut() else { continue };
                match delivery {
                    Ok(d) => {
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
                            // Messages already taken are still ours to report; the next
                            // settle finds the link gone and reports their locks lost.
                            let _ = p.reply.send(if p.got.is_empty() { Err(format!("receiving: {e}")) } else { Ok(p.got) });
                        }
                        break;
                    }
                }
            },
            _ = sleep_until(deadline), if pending.is_some() => {
                if let Some(p) = pending.take() {
                    let _ = p.reply.send(Ok(p.got));
                }
            }
        }
    }
    // The connection may already be gone; do not let a dead peer hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver.close()).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
