//! One client connection: sessions, links, flow control, transfers and
//! settlement, mapped onto the queue store and the request-response nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fe2o3_amqp_types::definitions::{
    self, AmqpError, ErrorCondition, Handle, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Accepted, Body, DeliveryState, Rejected, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Performative, Transfer,
};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::auth::{self, Claim, Need};
use crate::frame::{self, Frame, FrameError};
use crate::management::{self, ARGUMENT_OUT_OF_RANGE, LOCK_LOST, decode_message, encode_message};
use crate::store::{AmqpMessage, Settlement, Subqueue, message_id_string, now_ms};
use crate::{LinkKind, Shared, lock};

const BATCH_FORMAT: u32 = 0x8001_3700;
/// Service Bus's limits on a message's id and on its headers (properties,
/// application properties and annotations together).
const MAX_MESSAGE_ID: usize = 128;
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MESSAGE_SIZE_EXCEEDED: &str = "amqp:link:message-size-exceeded";
const DETACH_FORCED: &str = "amqp:link:detach-forced";
/// The service's highest channel number.
const CHANNEL_MAX: u16 = 4999;
const SENDER_CREDIT: u32 = 1000;
const INCOMING_WINDOW: u32 = 65_536;
const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Queue(String, Subqueue),
    Management(String, Subqueue),
    Cbs,
}

/// `amqps://host/queue`, `sb://host/queue`, `/queue`, `queue`, with optional
/// `/$DeadLetterQueue` and `/$management` suffixes.
fn parse_address(address: &str) -> Option<Node> {
    let path = match address.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, p)| p),
        None => address,
    };
    let path = path.trim_matches('/');
    if path.eq_ignore_ascii_case("$cbs") {
        return Some(Node::Cbs);
    }
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let management = parts
        .last()
        .is_some_and(|p| p.eq_ignore_ascii_case("$management"));
    if management {
        parts.pop();
    }
    let dead_letter = parts
        .last()
        .is_some_and(|p| p.eq_ignore_ascii_case("$DeadLetterQueue"));
    if dead_letter {
        parts.pop();
    }
    if parts.len() != 1 || parts[0].starts_with('$') {
        return None;
    }
    let sub = if dead_letter {
        Subqueue::DeadLetter
    } else {
        Subqueue::Main
    };
    let queue = parts[0].to_string();
    Some(if management {
        Node::Management(queue, sub)
    } else {
        Node::Queue(queue, sub)
    })
}

/// A link whose far end receives (the broker sends on it).
struct Outgoing {
    node: Node,
    reply_address: Option<String>,
    receive_and_delete: bool,
    delivery_count: u32,
    credit: u32,
    drain: bool,
    outbox: VecDeque<AmqpMessage>,
}

/// A link whose far end sends.
struct Incoming {
    node: Node,
    delivery_count: u32,
    credit: u32,
    partial: Option<(Transfer, BytesMut)>,
}

enum Link {
    Outgoing(Outgoing),
    Incoming(Incoming),
}

struct Unsettled {
    handle: u32,
    queue: String,
    sub: Subqueue,
    sequence: i64,
    lock_token: Uuid,
}

struct Session {
    local_channel: u16,
    next_outgoing_id: u32,
    next_incoming_id: u32,
    remote_incoming_window: u32,
    next_delivery_id: u32,
    links: HashMap<u32, Link>,
    meta: HashMap<u32, LinkMeta>,
    unsettled: HashMap<u32, Unsettled>,
}

/// What the idle timer and the authorization checks need to know about a link.
struct LinkMeta {
    name: String,
    kind: LinkKind,
    /// Entity path for authorization (`q`, `q/$deadletterqueue/$management`); none for `$cbs`.
    entity: Option<String>,
    need: Need,
    last_active: Instant,
}

struct Conn {
    shared: Arc<Shared>,
    out: BytesMut,
    remote_max_frame: usize,
    heartbeat_every: Option<Duration>,
    last_write: Instant,
    last_read: Instant,
    sessions: HashMap<u16, Session>,
    /// Claims left by put-tokens on this connection.
    claims: Vec<Claim>,
    /// Since when the connection has had no link.
    no_links_since: Option<Instant>,
    opened: bool,
    closing: bool,
}

pub async fn serve<S>(shared: Arc<Shared>, mut socket: S) -> Result<(), FrameError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    frame::handshake(&mut socket).await?;
    let max_frame = shared.config.max_frame_size;
    let (mut reader, writer) = tokio::io::split(socket);
    let (tx, mut rx) = mpsc::channel::<Result<Frame, FrameError>>(64);
    let read_task = tokio::spawn(async move {
        loop {
            let f = frame::read_frame(&mut reader, max_frame).await;
            let stop = f.is_err();
            if tx.send(f).await.is_err() || stop {
                break;
            }
        }
    });
    let mut changed = shared.changed.subscribe();
    let mut kill = shared.kill.subscribe();
    let mut detach = shared.detach.subscribe();
    let mut revoke = shared.revoke.subscribe();
    let mut conn = Conn {
        shared,
        out: BytesMut::new(),
        remote_max_frame: 512,
        heartbeat_every: None,
        last_write: Instant::now(),
        last_read: Instant::now(),
        sessions: HashMap::new(),
        claims: Vec::new(),
        no_links_since: Some(Instant::now()),
        opened: false,
        closing: false,
    };
    let mut writer = Writer::new(writer, conn.shared.config.write_delay);
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(f)) => {
                    conn.last_read = Instant::now();
                    if let Err(e) = conn.on_frame(f) {
                        break Err(e);
                    }
                }
                Some(Err(FrameError::Protocol(why))) => {
                    // A frame over the max-frame-size (or otherwise malformed) ends the
                    // connection with a framing error, as the spec asks.
                    conn.close_with(AmqpError::FrameSizeTooSmall.into(), &why);
                    let buf = conn.out.split();
                    let _ = writer.write(buf.freeze()).await;
                    break Err(FrameError::Protocol(why));
                }
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            },
            _ = changed.changed() => {}
            _ = kill.changed() => break Ok(()),
            _ = revoke.changed() => {
                revoke.borrow_and_update();
                conn.claims.clear();
                conn.on_tick();
            }
            _ = detach.changed() => {
                let (_, kind) = *detach.borrow_and_update();
                conn.force_detach(kind, "The link is force detached (requested by the test).");
            }
            _ = tick.tick() => {
                if let Some(every) = conn.heartbeat_every
                    && conn.last_write.elapsed() >= every
                {
                    frame::encode_heartbeat(&mut conn.out);
                }
                conn.on_tick();
            }
        }
        conn.pump_all();
        if !conn.out.is_empty() {
            let buf = conn.out.split();
            if let Err(e) = writer.write(buf.freeze()).await {
                break Err(e.into());
            }
            conn.last_write = Instant::now();
        }
        if conn.closing {
            break Ok(());
        }
    };
    read_task.abort();
    writer.shutdown().await;
    result
}

/// The connection's writing half, written at once or, with a write delay,
/// by a task that holds each buffer until its time (order kept).
enum Writer<W> {
    Direct(W),
    Delayed {
        queue: mpsc::UnboundedSender<(tokio::time::Instant, Bytes)>,
        task: tokio::task::JoinHandle<()>,
        failed: Arc<std::sync::atomic::AtomicBool>,
    },
}

impl<W: AsyncWrite + Unpin + Send + 'static> Writer<W> {
    fn new(mut w: W, delay: Duration) -> Self {
        if delay.is_zero() {
            return Writer::Direct(w);
        }
        let (queue, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Bytes)>();
        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = failed.clone();
        let task = tokio::spawn(async move {
            while let Some((due, buf)) = rx.recv().await {
                tokio::time::sleep_until(due + delay).await;
                if w.write_all(&buf).await.is_err() {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
        Writer::Delayed {
            queue,
            task,
            failed,
        }
    }

    async fn write(&mut self, buf: Bytes) -> std::io::Result<()> {
        match self {
            Writer::Direct(w) => w.write_all(&buf).await,
            Writer::Delayed { queue, failed, .. } => {
                if failed.load(std::sync::atomic::Ordering::Relaxed)
                    || queue.send((tokio::time::Instant::now(), buf)).is_err()
                {
                    return Err(std::io::Error::other("delayed writer failed"));
                }
                Ok(())
            }
        }
    }

    async fn shutdown(self) {
        match self {
            Writer::Direct(mut w) => {
                let _ = w.shutdown().await;
            }
            Writer::Delayed { queue, task, .. } => {
                drop(queue);
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
        }
    }
}

/// An error with all three fields on the wire: Microsoft's Python SDK reads
/// `info` by position, and `serde_amqp` would drop a trailing null.
fn link_error(condition: impl Into<ErrorCondition>, description: &str) -> definitions::Error {
    definitions::Error {
        condition: condition.into(),
        description: Some(description.to_string()),
        info: Some(Box::default()),
    }
}

impl Conn {
    fn send(&mut self, channel: u16, p: Performative) {
        if let Err(e) = frame::encode_amqp(&mut self.out, channel, &p, &[]) {
            tracing::warn!(error = %e, "encode failed");
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<(), FrameError> {
        let Some(p) = f.performative else {
            return Ok(());
        };
        match p {
            Performative::Open(open) => self.on_open(open),
            Performative::Close(_) => {
                self.send(0, Performative::Close(Close { error: None }));
                self.closing = true;
            }
            Performative::Begin(begin) => self.on_begin(f.channel, begin),
            Performative::End(_) => {
                if let Some(s) = self.sessions.remove(&f.channel) {
                    self.send(s.local_channel, Performative::End(End { error: None }));
                }
            }
            Performative::Attach(attach) => self.on_attach(f.channel, attach),
            Performative::Detach(detach) => {
                if let Some(s) = self.sessions.get_mut(&f.channel) {
                    let handle = detach.handle.0;
                    // A detach answering ours (or a refused attach) needs no answer.
                    if s.links.remove(&handle).is_some() {
                        s.meta.remove(&handle);
                        s.unsettled.retain(|_, u| u.handle != handle);
                        let ch = s.local_channel;
                        self.send(
                            ch,
                            Performative::Detach(Detach {
                                handle: detach.handle,
                                closed: detach.closed,
                                error: None,
                            }),
                        );
                    }
                }
            }
            Performative::Flow(flow) => self.on_flow(f.channel, flow),
            Performative::Transfer(t) => self.on_transfer(f.channel, t, f.payload),
            Performative::Disposition(d) => self.on_disposition(f.channel, d),
        }
        Ok(())
    }

    fn on_open(&mut self, open: Open) {
        self.remote_max_frame = (open.max_frame_size.0 as usize).max(512);
        self.heartbeat_every = open
            .idle_time_out
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(u64::from(t) / 2));
        self.opened = true;
        let idle_ms =
            u32::try_from(self.shared.config.idle_time_out.as_millis()).unwrap_or(u32::MAX);
        // The service's own values: max frame 65,536, idle-time-out 120,000 ms.
        let reply = Open {
            container_id: format!("{}_G0", Uuid::new_v4().simple()),
            hostname: None,
            max_frame_size: self.shared.config.max_frame_size.into(),
            channel_max: open.channel_max.0.min(CHANNEL_MAX).into(),
            idle_time_out: Some(idle_ms),
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.send(0, Performative::Open(reply));
    }

    fn on_begin(&mut self, channel: u16, begin: Begin) {
        let session = Session {
            local_channel: channel,
            next_outgoing_id: 0,
            next_incoming_id: begin.next_outgoing_id,
            remote_incoming_window: begin.incoming_window,
            next_delivery_id: 0,
            links: HashMap::new(),
            meta: HashMap::new(),
            unsettled: HashMap::new(),
        };
        let reply = Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: INCOMING_WINDOW,
            outgoing_window: u32::MAX,
            handle_max: begin.handle_max,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.sessions.insert(channel, session);
        self.send(channel, Performative::Begin(reply));
    }

    fn on_attach(&mut self, channel: u16, attach: Attach) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        let local_channel = session.local_channel;
        let client_sends = attach.role == Role::Sender;
        let address = if client_sends {
            match attach.target.as_deref() {
                Some(TargetArchetype::Target(t)) => t.address.clone(),
                #[allow(unreachable_patterns)]
                _ => None,
            }
        } else {
            attach.source.as_ref().and_then(|s| s.address.clone())
        };
        let node = address.as_deref().and_then(parse_address);
        let (kind, entity, need) = match &node {
            Some(Node::Cbs) | None => (LinkKind::Cbs, None, Need::SendOrListen),
            Some(Node::Management(q, sub)) => (
                LinkKind::Management,
                Some(format!("{}/$management", entity_path(q, *sub))),
                Need::SendOrListen,
            ),
            Some(Node::Queue(q, sub)) if client_sends => {
                (LinkKind::Sender, Some(entity_path(q, *sub)), Need::Send)
            }
            Some(Node::Queue(q, sub)) => {
                (LinkKind::Receiver, Some(entity_path(q, *sub)), Need::Listen)
            }
        };
        let now = now_ms();
        if matches!(node, Some(Node::Queue(..))) {
            let mut faults = lock(&self.shared.faults);
            if faults.ignore_attaches > 0 {
                faults.ignore_attaches -= 1;
                tracing::debug!(name = %attach.name, "attach left unanswered (injected fault)");
                return;
            }
        }
        let refusal = match &node {
            None => Some(link_error(
                AmqpError::NotFound,
                &format!("entity {address:?} not found"),
            )),
            Some(Node::Queue(q, _) | Node::Management(q, _)) if !self.shared.queue_exists(q) => {
                Some(link_error(
                    AmqpError::NotFound,
                    &format!("The messaging entity '{q}' could not be found."),
                ))
            }
            Some(Node::Queue(_, Subqueue::DeadLetter)) if client_sends => Some(link_error(
                AmqpError::NotAllowed,
                "cannot send to a dead-letter queue",
            )),
            Some(Node::Queue(..)) => lock(&self.shared.faults)
                .refuse_attaches
                .pop_front()
                .map(|condition| {
                    link_error(
                        ErrorCondition::Custom(Symbol::from(condition.as_str())),
                        "The request was refused (injected fault).",
                    )
                }),
            _ => None,
        }
        .or_else(|| {
            let entity = entity.as_deref()?;
            if !auth::enabled(&self.shared.config)
                || auth::authorized_until(&self.claims, entity, need).is_some_and(|t| t > now)
            {
                return None;
            }
            Some(link_error(
                AmqpError::UnauthorizedAccess,
                &format!(
                    "Unauthorized access. '{}' claim(s) are required to perform this operation. Resource: '{entity}'.",
                    need.claim_name()
                ),
            ))
        });
        let reply_address = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.address.clone(),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        let reply = Attach {
            name: attach.name.clone(),
            handle: attach.handle.clone(),
            role: if client_sends {
                Role::Receiver
            } else {
                Role::Sender
            },
            snd_settle_mode: attach.snd_settle_mode.clone(),
            rcv_settle_mode: attach.rcv_settle_mode.clone(),
            source: attach.source.clone(),
            target: if refusal.is_some() && client_sends {
                None
            } else {
                attach.target.clone()
            },
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: if client_sends { None } else { Some(0) },
            max_message_size: Some(self.shared.config.max_message_size),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        let handle = attach.handle.0;
        let reply = if refusal.is_some() && !client_sends {
            Attach {
                source: None,
                ..reply
            }
        } else {
            reply
        };
        tracing::debug!(name = %attach.name, ?address, ?kind, refused = ?refusal, "attach");
        self.send(local_channel, Performative::Attach(reply));
        if let Some(error) = refusal {
            self.send(
                local_channel,
                Performative::Detach(Detach {
                    handle: Handle(handle),
                    closed: true,
                    error: Some(error),
                }),
            );
            return;
        }
        let Some(node) = node else { return };
        if let Node::Queue(q, _) | Node::Management(q, _) = &node {
            let mut inner = lock(&self.shared.inner);
            self.shared.queue_mut(&mut inner, q);
        }
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        session.meta.insert(
            handle,
            LinkMeta {
                name: attach.name.clone(),
                kind,
                entity,
                need,
                last_active: Instant::now(),
            },
        );
        if client_sends {
            session.links.insert(
                handle,
                Link::Incoming(Incoming {
                    node,
                    delivery_count: attach.initial_delivery_count.unwrap_or(0),
                    credit: SENDER_CREDIT,
                    partial: None,
                }),
            );
            self.send_link_flow(channel, handle);
        } else {
            let receive_and_delete = attach.snd_settle_mode == SenderSettleMode::Settled;
            session.links.insert(
                handle,
                Link::Outgoing(Outgoing {
                    node,
                    reply_address,
                    receive_and_delete,
                    delivery_count: 0,
                    credit: 0,
                    drain: false,
                    outbox: VecDeque::new(),
                }),
            );
        }
    }

    fn session_flow(s: &Session) -> Flow {
        Flow {
            next_incoming_id: Some(s.next_incoming_id),
            incoming_window: INCOMING_WINDOW,
            next_outgoing_id: s.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }
    }

    fn send_link_flow(&mut self, channel: u16, handle: u32) {
        let Some(s) = self.sessions.get(&channel) else {
            return;
        };
        let mut flow = Self::session_flow(s);
        flow.handle = Some(Handle(handle));
        match s.links.get(&handle) {
            Some(Link::Incoming(l)) => {
                flow.delivery_count = Some(l.delivery_count);
                flow.link_credit = Some(l.credit);
            }
            Some(Link::Outgoing(l)) => {
                flow.delivery_count = Some(l.delivery_count);
                flow.link_credit = Some(l.credit);
                flow.drain = l.drain;
                flow.available = Some(0);
            }
            None => return,
        }
        let ch = s.local_channel;
        self.send(ch, Performative::Flow(flow));
    }

    fn on_flow(&mut self, channel: u16, flow: Flow) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        s.remote_incoming_window = flow
            .next_incoming_id
            .unwrap_or(0)
            .wrapping_add(flow.incoming_window)
            .wrapping_sub(s.next_outgoing_id);
        let Some(handle) = flow.handle.map(|h| h.0) else {
            if flow.echo {
                let f = Self::session_flow(s);
                let ch = s.local_channel;
                self.send(ch, Performative::Flow(f));
            }
            return;
        };
        if let Some(Link::Outgoing(l)) = s.links.get_mut(&handle) {
            let their_count = flow.delivery_count.unwrap_or(0);
            let credit = flow.link_credit.unwrap_or(0);
            l.credit = their_count
                .wrapping_add(credit)
                .wrapping_sub(l.delivery_count);
            if l.credit > 1_000_000 {
                l.credit = 0; // stale flow that predates deliveries already sent
            }
            l.drain = flow.drain;
        }
        if flow.echo {
            self.send_link_flow(channel, handle);
        }
    }

    fn on_transfer(&mut self, channel: u16, t: Transfer, payload: Bytes) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        s.next_incoming_id = s.next_incoming_id.wrapping_add(1);
        let handle = t.handle.0;
        if let Some(m) = s.meta.get_mut(&handle) {
            m.last_active = Instant::now();
        }
        let Some(Link::Incoming(link)) = s.links.get_mut(&handle) else {
            return;
        };
        let (first, buf) = match link.partial.take() {
            Some((first, mut buf)) => {
                buf.extend_from_slice(&payload);
                (first, buf)
            }
            None => (t.clone(), BytesMut::from(&payload[..])),
        };
        if t.more {
            link.partial = Some((first, buf));
            return;
        }
        if t.aborted {
            return;
        }
        link.delivery_count = link.delivery_count.wrapping_add(1);
        link.credit = link.credit.saturating_sub(1);
        let refill = link.credit < SENDER_CREDIT / 2;
        if refill {
            link.credit = SENDER_CREDIT;
        }
        let node = link.node.clone();
        if matches!(node, Node::Queue(..)) {
            let mut faults = lock(&self.shared.faults);
            if faults.hold_transfers > 0 {
                faults.hold_transfers -= 1;
                self.shared
                    .transfers_received
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
        }
        let outcome = self.deliver_incoming(channel, &node, &first, buf.freeze());
        let Some(s) = self.sessions.get(&channel) else {
            return;
        };
        let ch = s.local_channel;
        if !first.settled.unwrap_or(false)
            && let Some(delivery_id) = first.delivery_id
        {
            self.send(
                ch,
                Performative::Disposition(Disposition {
                    role: Role::Receiver,
                    first: delivery_id,
                    last: None,
                    settled: true,
                    state: Some(outcome),
                    batchable: false,
                }),
            );
        }
        if refill {
            self.send_link_flow(channel, handle);
        }
    }

    fn deliver_incoming(
        &mut self,
        channel: u16,
        node: &Node,
        t: &Transfer,
        payload: Bytes,
    ) -> DeliveryState {
        let decoded = match decode_message(&payload) {
            Ok(m) => m,
            Err(e) => {
                return DeliveryState::Rejected(Rejected {
                    error: Some(link_error(
                        AmqpError::DecodeError,
                        &format!("cannot decode message: {e}"),
                    )),
                });
            }
        };
        match node {
            Node::Queue(q, _) => {
                self.shared
                    .transfers_received
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let injected = lock(&self.shared.faults).reject_transfers.pop_front();
                if let Some(condition) = injected {
                    return DeliveryState::Rejected(Rejected {
                        error: Some(link_error(
                            ErrorCondition::Custom(Symbol::from(condition.as_str())),
                            "The request was rejected (fault injected by the test broker).",
                        )),
                    });
                }
                let limit = self.shared.config.max_message_size;
                if payload.len() as u64 > limit {
                    return DeliveryState::Rejected(Rejected {
                        error: Some(link_error(
                            ErrorCondition::Custom(Symbol::from(MESSAGE_SIZE_EXCEEDED)),
                            &format!(
                                "The received message (delivery-id:{}, size:{} bytes) exceeds the limit ({limit} bytes) currently allowed on the link.",
                                t.delivery_id.unwrap_or_default(),
                                payload.len()
                            ),
                        )),
                    });
                }
                let messages = if t.message_format == Some(BATCH_FORMAT) {
                    match &decoded.body {
                        Body::Data(batch) => {
                            let mut out = Vec::new();
                            for data in batch.iter() {
                                match decode_message(&data.0) {
                                    Ok(m) => out.push(m),
                                    Err(e) => {
                                        return DeliveryState::Rejected(Rejected {
                                            error: Some(link_error(
                                                AmqpError::DecodeError,
                                                &format!("bad batch entry: {e}"),
                                            )),
                                        });
                                    }
                                }
                            }
                            out
                        }
                        _ => Vec::new(),
                    }
                } else {
                    vec![decoded]
                };
                if let Some(refusal) = messages.iter().find_map(limit_refusal) {
                    return DeliveryState::Rejected(Rejected {
                        error: Some(refusal),
                    });
                }
                let now = now_ms();
                {
                    let mut inner = lock(&self.shared.inner);
                    let Some(queue) = self.shared.queue_mut(&mut inner, q) else {
                        return DeliveryState::Rejected(Rejected {
                            error: Some(link_error(
                                AmqpError::NotFound,
                                &format!("The messaging entity '{q}' could not be found."),
                            )),
                        });
                    };
                    for m in messages {
                        queue.enqueue(m, now);
                    }
                }
                self.shared.notify();
                DeliveryState::Accepted(Accepted {})
            }
            Node::Cbs => {
                let (reply, claim) = management::handle_cbs(&self.shared, &decoded);
                if let Some(claim) = claim {
                    self.claims.retain(|c| c.path != claim.path);
                    self.claims.push(claim);
                }
                self.route_reply(channel, node, reply);
                DeliveryState::Accepted(Accepted {})
            }
            Node::Management(q, sub) => {
                let reply = management::handle_management(
                    &self.shared,
                    q,
                    *sub,
                    &decoded,
                    self.link_names(),
                );
                self.route_reply(channel, node, reply);
                DeliveryState::Accepted(Accepted {})
            }
        }
    }

    /// Responses go to the link on the same node whose target is the request's reply-to.
    fn route_reply(&mut self, channel: u16, node: &Node, reply: AmqpMessage) {
        let reply_to = reply.properties.as_ref().and_then(|p| p.to.clone());
        let mut candidates: Vec<(u16, u32, bool)> = Vec::new();
        for (ch, s) in &self.sessions {
            for (h, l) in &s.links {
                if let Link::Outgoing(o) = l
                    && &o.node == node
                {
                    let exact = reply_to.is_some() && o.reply_address == reply_to;
                    candidates.push((*ch, *h, exact || *ch == channel));
                }
            }
        }
        candidates.sort_by_key(|c| !c.2);
        if let Some((ch, h, _)) = candidates.first()
            && let Some(Link::Outgoing(o)) =
                self.sessions.get_mut(ch).and_then(|s| s.links.get_mut(h))
        {
            o.outbox.push_back(reply);
        }
    }

    fn on_disposition(&mut self, channel: u16, d: Disposition) {
        if d.role != Role::Receiver {
            return;
        }
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        let ch = s.local_channel;
        let last = d.last.unwrap_or(d.first);
        let mut replies = Vec::new();
        let mut id = d.first;
        loop {
            if let Some(u) = s.unsettled.remove(&id) {
                if let Some(m) = s.meta.get_mut(&u.handle) {
                    m.last_active = Instant::now();
                }
                let state = match &d.state {
                    Some(state) => settle(&self.shared, &u, state),
                    None => None,
                };
                // A refused settlement leaves the lock (and the delivery) as it was.
                if let Some(DeliveryState::Rejected(Rejected { error: Some(e) })) = &state
                    && e.condition == ErrorCondition::Custom(Symbol::from(ARGUMENT_OUT_OF_RANGE))
                {
                    s.unsettled.insert(id, u);
                }
                if !d.settled
                    && let Some(state) = state
                {
                    replies.push((id, state));
                }
            }
            if id == last {
                break;
            }
            id = id.wrapping_add(1);
        }
        for (id, state) in replies {
            self.send(
                ch,
                Performative::Disposition(Disposition {
                    role: Role::Sender,
                    first: id,
                    last: None,
                    settled: true,
                    state: Some(state),
                    batchable: false,
                }),
            );
        }
        self.shared.notify();
    }

    fn link_names(&self) -> Vec<String> {
        self.sessions
            .values()
            .flat_map(|s| s.meta.values().map(|m| m.name.clone()))
            .collect()
    }

    fn close_with(&mut self, condition: ErrorCondition, description: &str) {
        self.send(
            0,
            Performative::Close(Close {
                error: Some(link_error(condition, description)),
            }),
        );
        self.closing = true;
    }

    /// Detach a link from the broker's side; its locks stay until they expire.
    fn detach_link(&mut self, channel: u16, handle: u32, error: definitions::Error) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        if s.links.remove(&handle).is_none() {
            return;
        }
        s.meta.remove(&handle);
        s.unsettled.retain(|_, u| u.handle != handle);
        let ch = s.local_channel;
        self.send(
            ch,
            Performative::Detach(Detach {
                handle: Handle(handle),
                closed: true,
                error: Some(error),
            }),
        );
    }

    fn links_where(&self, keep: impl Fn(&LinkMeta) -> bool) -> Vec<(u16, u32, String, LinkKind)> {
        self.sessions
            .iter()
            .flat_map(|(ch, s)| {
                s.meta
                    .iter()
                    .filter(|(_, m)| keep(m))
                    .map(|(h, m)| (*ch, *h, m.name.clone(), m.kind))
            })
            .collect()
    }

    pub(crate) fn force_detach(&mut self, kind: Option<LinkKind>, why: &str) {
        for (ch, h, name, _) in self.links_where(|m| kind.is_none_or(|k| m.kind == k)) {
            let description = format!("The link '{name}' is force detached. {why}");
            self.detach_link(
                ch,
                h,
                link_error(
                    ErrorCondition::Custom(Symbol::from(DETACH_FORCED)),
                    &description,
                ),
            );
        }
    }

    /// The service's timers: heartbeat silence, idle links, expired tokens,
    /// and connections left without links.
    fn on_tick(&mut self) {
        if !self.opened || self.closing {
            return;
        }
        let config = self.shared.config.clone();
        if self.last_read.elapsed() > config.idle_time_out {
            self.close_with(
                AmqpError::ResourceLimitExceeded.into(),
                &format!(
                    "The connection was silent for longer than its idle time-out of {} ms.",
                    config.idle_time_out.as_millis()
                ),
            );
            return;
        }
        let idle = config.link_idle_timeout;
        for (ch, h, name, kind) in self.links_where(|m| m.last_active.elapsed() >= idle) {
            let (code, role) = match kind {
                LinkKind::Sender => ("publisher", "AmqpMessagePublisher"),
                LinkKind::Receiver => ("consumer", "AmqpMessageConsumer"),
                LinkKind::Management | LinkKind::Cbs => ("requestresponse", "AmqpRequestResponse"),
            };
            let description = format!(
                "The link '{name}' is force detached. Code: {code}. Details: {role}.IdleTimerExpired: Idle timeout: {} ms.",
                idle.as_millis()
            );
            self.detach_link(
                ch,
                h,
                link_error(
                    ErrorCondition::Custom(Symbol::from(DETACH_FORCED)),
                    &description,
                ),
            );
        }
        if auth::enabled(&config) {
            let now = now_ms();
            let claims = self.claims.clone();
            let expired = self.links_where(|m| {
                m.entity.as_deref().is_some_and(|e| {
                    auth::authorized_until(&claims, e, m.need).is_none_or(|t| t <= now)
                })
            });
            for (ch, h, name, _) in expired {
                let description = format!(
                    "ExpiredToken: the token authorizing link '{name}' has expired; put a new token on $cbs before it does."
                );
                self.detach_link(
                    ch,
                    h,
                    link_error(AmqpError::UnauthorizedAccess, &description),
                );
            }
        }
        let has_links = self.sessions.values().any(|s| !s.links.is_empty());
        if has_links {
            self.no_links_since = None;
        } else {
            let since = *self.no_links_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= config.connection_idle_timeout {
                self.close_with(
                    ErrorCondition::ConnectionError(definitions::ConnectionError::ConnectionForced),
                    &format!(
                        "The connection was inactive for more than the allowed {} milliseconds and is closed by container 'LinkTracker'.",
                        config.connection_idle_timeout.as_millis()
                    ),
                );
            }
        }
    }

    fn pump_all(&mut self) {
        if !self.opened || self.closing {
            return;
        }
        let channels: Vec<u16> = self.sessions.keys().copied().collect();
        for ch in channels {
            let handles: Vec<u32> = self.sessions[&ch].links.keys().copied().collect();
            for h in handles {
                self.pump(ch, h);
            }
        }
    }

    fn pump(&mut self, channel: u16, handle: u32) {
        loop {
            let Some(s) = self.sessions.get_mut(&channel) else {
                return;
            };
            if s.remote_incoming_window == 0 {
                return;
            }
            let Some(Link::Outgoing(link)) = s.links.get_mut(&handle) else {
                return;
            };
            if link.credit == 0 {
                return;
            }
            let next = match &link.node {
                // Fault: messages wait for the drain and go just before its answer.
                Node::Queue(..)
                    if !link.drain && lock(&self.shared.faults).deliver_at_drain > 0 =>
                {
                    return;
                }
                Node::Queue(q, sub) => {
                    let now = now_ms();
                    let mut inner = lock(&self.shared.inner);
                    let Some(queue) = self.shared.queue_mut(&mut inner, q) else {
                        return;
                    };
                    queue.expire_locks(now);
                    if link.receive_and_delete {
                        queue.take(*sub, now).map(|m| (m, None))
                    } else {
                        queue.lease(*sub, now).map(|l| {
                            let u = Unsettled {
                                handle,
                                queue: q.clone(),
                                sub: *sub,
                                sequence: l.sequence,
                                lock_token: l.lock_token,
                            };
                            (l.message, Some(u))
                        })
                    }
                }
                Node::Management(..) | Node::Cbs => link.outbox.pop_front().map(|m| (m, None)),
            };
            let Some((message, unsettled)) = next else {
                if link.drain && matches!(link.node, Node::Queue(..)) {
                    let mut faults = lock(&self.shared.faults);
                    if faults.ignore_drains > 0 {
                        faults.ignore_drains -= 1;
                        link.drain = false;
                        return;
                    }
                    faults.deliver_at_drain = faults.deliver_at_drain.saturating_sub(1);
                }
                if link.drain {
                    link.delivery_count = link.delivery_count.wrapping_add(link.credit);
                    link.credit = 0;
                    self.send_link_flow(channel, handle);
                    if let Some(Link::Outgoing(l)) = self
                        .sessions
                        .get_mut(&channel)
                        .and_then(|s| s.links.get_mut(&handle))
                    {
                        l.drain = false;
                    }
                }
                return;
            };
            link.credit -= 1;
            link.delivery_count = link.delivery_count.wrapping_add(1);
            if let Some(m) = s.meta.get_mut(&handle) {
                m.last_active = Instant::now();
            }
            let settled = unsettled.is_none();
            // Lock tokens travel as the delivery tag in .NET GUID byte order.
            let tag = match &unsettled {
                Some(u) => u.lock_token.to_bytes_le().to_vec(),
                None => Uuid::new_v4().to_bytes_le().to_vec(),
            };
            let delivery_id = s.next_delivery_id;
            s.next_delivery_id = s.next_delivery_id.wrapping_add(1);
            if let Some(u) = unsettled {
                s.unsettled.insert(delivery_id, u);
            }
            let transfer = Transfer {
                handle: Handle(handle),
                delivery_id: Some(delivery_id),
                delivery_tag: Some(ByteBuf::from(tag)),
                message_format: Some(0),
                settled: Some(settled),
                more: false,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
            self.send_transfer(channel, transfer, &encode_message(&message));
        }
    }

    /// Split a transfer across frames no larger than the peer's max-frame-size.
    fn send_transfer(&mut self, channel: u16, transfer: Transfer, payload: &[u8]) {
        let Some(s) = self.sessions.get_mut(&channel) else {
            return;
        };
        let ch = s.local_channel;
        let mut rest = payload;
        loop {
            let mut t = transfer.clone();
            let overhead =
                serde_amqp::to_vec(&Performative::Transfer(t.clone())).map_or(64, |v| v.len()) + 16;
            let room = self.remote_max_frame.saturating_sub(overhead).max(1);
            let (chunk, more) = if rest.len() > room {
                (&rest[..room], true)
            } else {
                (rest, false)
            };
            t.more = more;
            if let Err(e) = frame::encode_amqp(&mut self.out, ch, &Performative::Transfer(t), chunk)
            {
                tracing::warn!(error = %e, "encode failed");
                return;
            }
            s.next_outgoing_id = s.next_outgoing_id.wrapping_add(1);
            s.remote_incoming_window = s.remote_incoming_window.saturating_sub(1);
            rest = &rest[chunk.len()..];
            if !more {
                return;
            }
        }
    }
}

/// The path a token audience must cover for a queue or its dead-letter queue.
fn entity_path(queue: &str, sub: Subqueue) -> String {
    match sub {
        Subqueue::Main => queue.to_ascii_lowercase(),
        Subqueue::DeadLetter => format!("{}/$deadletterqueue", queue.to_ascii_lowercase()),
    }
}

/// Service Bus's per-message limits: a message id of at most 128 characters
/// and at most 64 KiB of headers.
fn limit_refusal(m: &AmqpMessage) -> Option<definitions::Error> {
    let id = m
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
        .map(message_id_string)
        .unwrap_or_default();
    // .NET string lengths, as the service counts: UTF-16 code units.
    let units = id.encode_utf16().count();
    if units > MAX_MESSAGE_ID {
        return Some(link_error(
            ErrorCondition::Custom(Symbol::from(ARGUMENT_OUT_OF_RANGE)),
            &format!(
                "The message id of {units} characters exceeds the maximum of {MAX_MESSAGE_ID}."
            ),
        ));
    }
    let size = |v: Result<Vec<u8>, serde_amqp::Error>| v.map_or(0, |b| b.len());
    let header_bytes = size(serde_amqp::to_vec(&m.properties))
        + size(serde_amqp::to_vec(&m.application_properties))
        + size(serde_amqp::to_vec(&m.message_annotations));
    if header_bytes > MAX_HEADER_BYTES {
        return Some(link_error(
            ErrorCondition::Custom(Symbol::from(MESSAGE_SIZE_EXCEEDED)),
            &format!(
                "The message headers ({header_bytes} bytes) exceed the maximum of {MAX_HEADER_BYTES} bytes."
            ),
        ));
    }
    None
}

/// Apply a receiver's outcome to the store; returns the outcome to confirm.
fn settle(shared: &Shared, u: &Unsettled, state: &DeliveryState) -> Option<DeliveryState> {
    let how = match state {
        DeliveryState::Accepted(_) => Settlement::Complete,
        DeliveryState::Released(_) => Settlement::Release,
        DeliveryState::Modified(_) => Settlement::Abandon,
        DeliveryState::Rejected(r) => {
            let info = r.error.as_ref().and_then(|e| e.info.as_deref());
            let field = |k: &str| match info.and_then(|i| i.get(&Symbol::from(k))) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Symbol(s)) => Some(s.0.clone()),
                _ => None,
            };
            let description = field("DeadLetterErrorDescription")
                .or_else(|| r.error.as_ref().and_then(|e| e.description.clone()));
            if let Some(why) = management::dead_letter_fields_refused(
                field("DeadLetterReason").as_deref(),
                description.as_deref(),
            ) {
                return Some(DeliveryState::Rejected(Rejected {
                    error: Some(link_error(
                        ErrorCondition::Custom(Symbol::from(ARGUMENT_OUT_OF_RANGE)),
                        &why,
                    )),
                }));
            }
            Settlement::DeadLetter {
                reason: field("DeadLetterReason"),
                description,
            }
        }
        _ => return None,
    };
    let result = {
        let mut inner = lock(&shared.inner);
        match shared.queue_mut(&mut inner, &u.queue) {
            Some(queue) => queue.settle(u.sub, u.sequence, u.lock_token, how, now_ms()),
            None => Err(crate::store::LockLost),
        }
    };
    Some(match result {
        // Service Bus echoes the outcome it applied; a dead-letter comes back as
        // `rejected` without an error (an error there means the settlement failed).
        Ok(()) if matches!(state, DeliveryState::Rejected(_)) => {
            DeliveryState::Rejected(Rejected { error: None })
        }
        Ok(()) => state.clone(),
        Err(_) => DeliveryState::Rejected(Rejected {
            error: Some(link_error(
                ErrorCondition::Custom(Symbol::from(LOCK_LOST)),
                "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.",
            )),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_the_sdks_send_them() {
        let q = |n: &str, s| Some(Node::Queue(n.into(), s));
        assert_eq!(parse_address("orders"), q("orders", Subqueue::Main));
        assert_eq!(
            parse_address("amqp://127.0.0.1:5672/orders"),
            q("orders", Subqueue::Main)
        );
        assert_eq!(
            parse_address("sb://ns.servicebus.windows.net/orders/$DeadLetterQueue"),
            q("orders", Subqueue::DeadLetter)
        );
        assert_eq!(
            parse_address("orders/$management"),
            Some(Node::Management("orders".into(), Subqueue::Main))
        );
        assert_eq!(
            parse_address("orders/$DeadLetterQueue/$management"),
            Some(Node::Management("orders".into(), Subqueue::DeadLetter))
        );
        assert_eq!(parse_address("$cbs"), Some(Node::Cbs));
        assert_eq!(parse_address("a/b"), None);
        assert_eq!(parse_address("$other"), None);
    }
}
