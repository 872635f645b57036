//! One peek-lock receiving link, owned by a task so that settling never waits
//! behind a receive that is waiting for messages.
//!
//! Credit is manual and bounded: each receive grants `max(max, prefetch)`,
//! so the broker never hands out (and starts lock clocks on) more than that.
//! Without prefetch, a receive that ends short drains the credit it left
//! (as the SDKs do). Draining is a state of the task, not a wait inside it:
//! settlements go on meanwhile, a receive that already has messages returns
//! them at once, and one that has none waits for the service's answer (at
//! most [`EMPTY_DRAIN_WAIT`]) — the link's credit at 0, by messages or by
//! the service advancing the delivery count — so messages that raced the
//! drain come back with it. Flow frames reach the link in order with
//! transfers (`vendor/fe2o3-amqp`), so once the credit shows 0 every
//! message sent before the answer has been received. The next grant of credit waits for the answer, so it counts
//! from the service's delivery count however long the round trip. A drain
//! the service does not answer within [`DRAIN_WAIT`] ends the link (the
//! next receive attaches a new one).
//!
//! Messages that arrive between receives (prefetch, or racing a drain) are
//! kept at most [`BUFFER_MAX_AGE`], then released by a timer, so a message
//! is never handed to the processor with a lock that ran out while it waited
//! here, nor kept locked while nobody asks; with nobody asking, the unused
//! credit is drained too, so the service does not hand them straight back.
//! When the link ends, buffered messages are released.

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
/// While a drain is unanswered, the credit is also looked at this often
/// without a flow notification: a transfer the service aborts uses credit
/// but is no delivery and no flow.
const DRAIN_LOOK_AGAIN: Duration = Duration::from_millis(500);
/// How long a receive that got nothing waits for its drain's answer (and
/// the messages that raced it); later ones go to the next receive.
const EMPTY_DRAIN_WAIT: Duration = Duration::from_secs(5);
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
    reply: Reply,
    /// Credit was granted for it (not while a drain is unanswered: the next
    /// grant must count from the delivery count the drain's answer brings).
    granted: bool,
    /// Answered when the drain ends (or at `deadline`, [`EMPTY_DRAIN_WAIT`]
    /// after the drain began): a short receive that got nothing waits for
    /// the messages that raced its drain.
    after_drain: bool,
}

/// A message that arrived with no receive waiting, and when.
struct Buffered {
    at: Instant,
    delivery: AmqpDelivery,
}

/// The link's state between commands, deliveries and timers.
struct Link {
    receiver: Receiver,
    prefetch: u32,
    pending: Option<Pending>,
    /// Deliveries that arrived between receives (prefetch, or racing a drain).
    buffered: Vec<Buffered>,
    /// A drain was sent and is not answered yet; given up at this instant.
    draining: Option<Instant>,
}

impl Link {
    /// Grant the credit a pending receive needs.
    async fn grant(&mut self) -> Result<(), String> {
        let Some(p) = self.pending.as_mut() else {
            return Ok(());
        };
        let wanted = u32::try_from(p.max.saturating_sub(p.got.len())).unwrap_or(u32::MAX);
        p.granted = true;
        self.receiver
            .set_credit(wanted.max(self.prefetch))
            .await
            .map_err(|e| format!("granting credit: {e}"))
    }

    /// Ask the service for the link's credit back (see the module's doc).
    async fn start_drain(&mut self) -> Result<(), String> {
        self.receiver
            .drain()
            .await
            .map_err(|e| format!("draining credit: {e}"))?;
        self.draining = Some(Instant::now() + DRAIN_WAIT);
        Ok(())
    }

    /// Once a drain's credit is back to 0 (the service's answer, or messages
    /// that used it up), the drain is over: every message sent before the
    /// answer has been received, as flow frames reach the link in order with
    /// transfers. Then the receive waiting for it is answered, or the credit
    /// a receive asked for meanwhile is granted.
    async fn drain_progress(&mut self) -> Result<(), String> {
        if self.draining.is_none() || self.receiver.credit() > 0 {
            return Ok(());
        }
        self.draining = None;
        if self.pending.as_ref().is_some_and(|p| p.after_drain) {
            self.answer();
        } else if self.pending.as_ref().is_some_and(|p| !p.granted) {
            self.grant().await?;
        }
        Ok(())
    }

    fn answer(&mut self) {
        if let Some(p) = self.pending.take() {
            let _ = p.reply.send(Ok(p.got));
        }
    }

    /// The pending receive's reply and what it has, for when the link fails.
    fn fail(&mut self, e: String) -> Option<(Reply, Received)> {
        self.pending.take().map(|p| {
            // Messages already taken are still ours to report; their
            // settlement goes by lock token once this link is gone.
            let result = if p.got.is_empty() { Err(e) } else { Ok(p.got) };
            (p.reply, result)
        })
    }
}

async fn run(receiver: Receiver, mut commands: mpsc::Receiver<Command>, prefetch: u32) {
    let mut link = Link {
        receiver,
        prefetch,
        pending: None,
        buffered: Vec::new(),
        draining: None,
    };
    // A receive the link failed under, answered once the link is closed (so
    // that what the caller does next, such as putting a token on `$cbs`, does
    // not race this link's detach on the session).
    let mut failed: Option<(Reply, Received)> = None;
    // Woken when `recv` applies a flow frame from the service (the answer
    // to a drain): the credit is looked at then, not polled.
    let flow_applied = link.receiver.flow_applied();
    loop {
        let deadline = link.pending.as_ref().map(|p| p.deadline);
        let draining_until = link.draining;
        // Buffered messages nobody asked for are released when they go stale.
        let stale_at = match link.pending {
            None => link.buffered.first().map(|b| b.at + BUFFER_MAX_AGE),
            Some(_) => None,
        };
        tokio::select! {
            command = commands.recv() => match command {
                None => break,
                Some(Command::Receive { max, wait, reply }) => {
                    let max = max.max(1);
                    if let Err(e) = release_stale(&mut link.receiver, &mut link.buffered).await {
                        let _ = reply.send(Err(e));
                        break;
                    }
                    if link.buffered.len() >= max {
                        let rest = link.buffered.split_off(max);
                        let now = std::mem::replace(&mut link.buffered, rest);
                        let _ = reply.send(Ok(now.into_iter().map(|b| b.delivery).collect()));
                        continue;
                    }
                    let got: Vec<_> = std::mem::take(&mut link.buffered).into_iter().map(|b| b.delivery).collect();
                    let wait = if got.is_empty() { wait } else { wait.min(BATCH_LINGER) };
                    link.pending = Some(Pending {
                        max,
                        deadline: Instant::now() + wait,
                        got,
                        reply,
                        granted: false,
                        after_drain: false,
                    });
                    // While a drain is unanswered the credit is granted once it is.
                    if link.draining.is_none()
                        && let Err(e) = link.grant().await
                    {
                        failed = link.fail(e);
                        break;
                    }
                }
                Some(Command::Settle { info, state, reply }) => {
                    let result = link.receiver.dispose(info, state).await.map_err(|e| format!("settling: {e}"));
                    let failed = result.is_err();
                    let _ = reply.send(result);
                    if failed {
                        break;
                    }
                }
            },
            // Always listening, so a detach by the service ends this task (and the
            // next settlement goes by lock token) even between receives.
            delivery = link.receiver.recv::<Body<Value>>() => match delivery {
                Ok(d) => {
                    match link.pending.as_mut() {
                        None => link.buffered.push(Buffered { at: Instant::now(), delivery: d }),
                        Some(p) => {
                            p.got.push(d);
                            if p.got.len() >= p.max {
                                link.answer();
                            } else if !p.after_drain {
                                p.deadline = p.deadline.min(Instant::now() + BATCH_LINGER);
                            }
                        }
                    }
                    // Messages can use the drained credit up, too.
                    if let Err(e) = link.drain_progress().await {
                        failed = link.fail(e);
                        break;
                    }
                }
                Err(e) => {
                    failed = link.fail(format!("receiving: {e}"));
                    break;
                }
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                let short = link
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.granted && !p.after_drain && p.got.len() < p.max);
                if prefetch == 0 && short && link.receiver.credit() > 0 {
                    if let Err(e) = link.start_drain().await {
                        failed = link.fail(e);
                        break;
                    }
                    // Messages already here go to the caller now; an empty
                    // receive waits for those that raced the drain.
                    if let Some(p) = link.pending.as_mut()
                        && p.got.is_empty()
                    {
                        p.after_drain = true;
                        p.deadline = Instant::now() + EMPTY_DRAIN_WAIT;
                        continue;
                    }
                }
                link.answer();
            }
            _ = tokio::time::timeout(DRAIN_LOOK_AGAIN, flow_applied.notified()), if draining_until.is_some() => {
                if let Err(e) = link.drain_progress().await {
                    failed = link.fail(e);
                    break;
                }
            }
            _ = sleep_until(draining_until), if draining_until.is_some() => {
                failed = link.fail(format!(
                    "the service did not answer a drain within {DRAIN_WAIT:?}; leaving the link"
                ));
                tracing::warn!("the service did not answer a drain within {DRAIN_WAIT:?}; leaving the link");
                break;
            }
            _ = sleep_until(stale_at), if stale_at.is_some() => {
                if let Err(e) = release_stale(&mut link.receiver, &mut link.buffered).await {
                    tracing::debug!(error = %e, "releasing stale messages failed; leaving the link");
                    break;
                }
                // Nobody asks: take the credit back, or the service hands the
                // released messages straight back to this link.
                if link.buffered.is_empty() && link.draining.is_none() && link.receiver.credit() > 0
                    && let Err(e) = link.start_drain().await
                {
                    tracing::debug!(error = %e, "draining unused credit failed; leaving the link");
                    break;
                }
            }
        }
    }
    if failed.is_none() {
        failed = link.fail("the receiving link ended".into());
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
    let Link {
        receiver,
        mut buffered,
        ..
    } = link;
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
