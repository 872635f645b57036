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
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Shared;
use crate::frame::{self, Frame, FrameError, MAX_FRAME_SIZE};
use crate::management::{self, LOCK_LOST, decode_message, encode_message};
use crate::store::{AmqpMessage, Settlement, Subqueue, now_ms};

const BATCH_FORMAT: u32 = 0x8001_3700;
const MAX_MESSAGE_SIZE: u64 = 256 * 1024;
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
    unsettled: HashMap<u32, Unsettled>,
}

struct Conn {
    shared: Arc<Shared>,
    out: BytesMut,
    remote_max_frame: usize,
    heartbeat_every: Option<Duration>,
    last_write: Instant,
    sessions: HashMap<u16, Session>,
    opened: bool,
    closing: bool,
}

pub async fn serve(shared: Arc<Shared>, mut socket: TcpStream) -> Result<(), FrameError> {
    socket.set_nodelay(true).ok();
    frame::handshake(&mut socket).await?;
    let (mut reader, mut writer) = socket.into_split();
    let (tx, mut rx) = mpsc::channel::<Result<Frame, FrameError>>(64);
    let read_task = tokio::spawn(async move {
        loop {
            let f = frame::read_frame(&mut reader).await;
            let stop = f.is_err();
            if tx.send(f).await.is_err() || stop {
                break;
            }
        }
    });
    let mut changed = shared.changed.subscribe();
    let mut kill = shared.kill.subscribe();
    let mut conn = Conn {
        shared,
        out: BytesMut::new(),
        remote_max_frame: 512,
        heartbeat_every: None,
        last_write: Instant::now(),
        sessions: HashMap::new(),
        opened: false,
        closing: false,
    };
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(f)) => {
                    if let Err(e) = conn.on_frame(f) {
                        break Err(e);
                    }
                }
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            },
            _ = changed.changed() => {}
            _ = kill.changed() => break Ok(()),
            _ = tick.tick() => {
                if let Some(every) = conn.heartbeat_every
                    && conn.last_write.elapsed() >= every
                {
                    frame::encode_heartbeat(&mut conn.out);
                }
            }
        }
        conn.pump_all();
        if !conn.out.is_empty() {
            let buf = conn.out.split();
            if let Err(e) = writer.write_all(&buf).await {
                break Err(e.into());
            }
            conn.last_write = Instant::now();
        }
        if conn.closing {
            break Ok(());
        }
    };
    read_task.abort();
    let _ = writer.shutdown().await;
    result
}

fn link_error(condition: impl Into<ErrorCondition>, description: &str) -> definitions::Error {
    definitions::Error {
        condition: condition.into(),
        description: Some(description.to_string()),
        info: None,
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
                    s.links.remove(&detach.handle.0);
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
            Performative::Flow(flow) => self.on_flow(f.channel, flow),
            Performative::Transfer(t) => self.on_transfer(f.channel, t, f.payload),
            Performative::Disposition(d) => self.on_disposition(f.channel, d),
        }
        Ok(())
    }

    fn on_open(&mut self, open: Open) {
        self.remote_max_frame =
            (open.max_frame_size.0 as usize).clamp(512, MAX_FRAME_SIZE as usize);
        self.heartbeat_every = open
            .idle_time_out
            .filter(|t| *t > 0)
            .map(|t| Duration::from_millis(u64::from(t) / 2));
        self.opened = true;
        let reply = Open {
            container_id: format!("sb-test-broker-{}", Uuid::new_v4().simple()),
            hostname: None,
            max_frame_size: MAX_FRAME_SIZE.into(),
            channel_max: open.channel_max,
            idle_time_out: None,
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
            _ => None,
        };
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
            max_message_size: Some(MAX_MESSAGE_SIZE),
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
            let mut inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.queue_mut(&mut inner, q);
        }
        let session = self
            .sessions
            .get_mut(&channel)
            .expect("session checked above");
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
                let now = now_ms();
                {
                    let mut inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
                    let queue = self.shared.queue_mut(&mut inner, q);
                    for m in messages {
                        queue.enqueue(m, now);
                    }
                }
                self.shared.notify();
                DeliveryState::Accepted(Accepted {})
            }
            Node::Cbs => {
                let reply = management::handle_cbs(&self.shared, &decoded);
                self.route_reply(channel, node, reply);
                DeliveryState::Accepted(Accepted {})
            }
            Node::Management(q, sub) => {
                let reply = management::handle_management(&self.shared, q, *sub, &decoded);
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
                let state = match &d.state {
                    Some(state) => settle(&self.shared, &u, state),
                    None => None,
                };
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
                Node::Queue(q, sub) => {
                    let now = now_ms();
                    let mut inner = self.shared.inner.lock().unwrap_or_else(|e| e.into_inner());
                    let queue = self.shared.queue_mut(&mut inner, q);
                    queue.expire_locks(now);
                    if link.receive_and_delete {
                        queue.take(*sub, now).map(|m| (m, None))
                    } else {
                        queue.lease(*sub, now).map(|l| {
                            let u = Unsettled {
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
            Settlement::DeadLetter {
                reason: field("DeadLetterReason"),
                description,
            }
        }
        _ => return None,
    };
    let result = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        let queue = shared.queue_mut(&mut inner, &u.queue);
        queue.settle(u.sub, u.sequence, u.lock_token, how, now_ms())
    };
    Some(match result {
        // Service Bus echoes the outcome it applied; a dead-letter comes back as
        // `rejected` without an error (an error there means the settlement failed).
        Ok(()) if matches!(state, DeliveryState::Rejected(_)) => DeliveryState::Rejected(Rejected { error: None }),
        Ok(()) => state.clone(),
        Err(_) => DeliveryState::Rejected(Rejected {
            error: Some(definitions::Error {
                condition: ErrorCondition::Custom(Symbol::from(LOCK_LOST)),
                description: Some(
                    "The lock supplied is invalid. Either the lock expired, or the message has already been removed from the queue.".into(),
                ),
                info: None,
            }),
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
