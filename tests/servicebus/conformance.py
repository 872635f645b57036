#!/usr/bin/env python3
"""Service Bus fidelity of the in-repo test broker, judged by Microsoft's
official Python SDK (azure-servicebus).

Starts `sb-test-broker` itself (path from --broker-bin or $SB_TEST_BROKER_BIN,
default target/debug/sb-test-broker) on free ports: a strict broker with short
lock settings for the message cases, and further instances for the cases that
need other settings (short idle timers, TLS, WebSockets, a shifted clock,
policies with limited rights). Each is driven through its `--control` input
(create a queue, inject a fault, force a detach).

Prints one line per case and ends with `N passed, M failed`; exits non-zero on
any failure. Every case uses its own queue, so cases do not see each other's
messages.
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
    TransportType,
)
from azure.servicebus.amqp import AmqpAnnotatedMessage
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
)

LOCK_SECS = 3
MAX_DELIVERY = 3
DUP_WINDOW_SECS = 60
KEY = "SAS_KEY_VALUE"
LINK_IDLE_SECS = 2
CLOCK_OFFSET_MS = 30_000


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


class Broker:
    """One sb-test-broker process, driven through --control."""

    def __init__(self, binary, extra, tmp, lock_secs=LOCK_SECS):
        self.ca_file = None
        args = [binary, "--port", "0", "--control", "--lock-duration-secs", str(lock_secs),
                "--max-delivery-count", str(MAX_DELIVERY), "--duplicate-window-secs", str(DUP_WINDOW_SECS),
                "--sas-key", KEY] + extra
        if "--tls" in extra:
            self.ca_file = os.path.join(tmp, f"ca-{uuid.uuid4().hex[:6]}.pem")
            args += ["--ca-file", self.ca_file]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"broker did not start: {line!r}")
        self.addr = line.split("listening on ", 1)[1]
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.tls = "--tls" in extra

    def control(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"broker control {command!r}: {answer!r}")
        return answer[2:].strip()

    def connection_string(self, key_name="RootManageSharedAccessKey", key=KEY):
        if self.tls:
            return f"Endpoint=sb://localhost/;SharedAccessKeyName={key_name};SharedAccessKey={key};"
        return (f"Endpoint=sb://{self.addr};SharedAccessKeyName={key_name};"
                f"SharedAccessKey={key};UseDevelopmentEmulator=true;")

    def client(self, conn_str=None, **kwargs):
        if self.tls:
            # The SDKs reach a namespace on another port through a custom endpoint address
            # (which otherwise defaults the SDK to WebSockets).
            kwargs.setdefault("custom_endpoint_address", f"sb://localhost:{self.port}")
            kwargs.setdefault("connection_verify", self.ca_file)
            kwargs.setdefault("transport_type", TransportType.Amqp)
        return ServiceBusClient.from_connection_string(conn_str or self.connection_string(), **kwargs)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Ctx:
    def __init__(self, client, lock_secs, max_delivery, broker=None, brokers=None):
        self.client = client
        self.lock_secs = lock_secs
        self.max_delivery = max_delivery
        self.broker = broker
        self.brokers = brokers

    def queue(self, broker=None):
        name = "conf-" + uuid.uuid4().hex[:10]
        broker = broker or self.broker
        if broker:
            broker.control(f"create-queue {name}")
        return name

    def send(self, queue, *messages):
        with self.client.get_queue_sender(queue) as s:
            s.send_messages(list(messages))

    def receive(self, queue, count=1, wait=5, sub_queue=None, mode=ServiceBusReceiveMode.PEEK_LOCK):
        """Receive until `count` messages arrived or `wait` passed; returns (receiver, messages).
        The caller closes the receiver."""
        r = self.client.get_queue_receiver(queue, sub_queue=sub_queue, receive_mode=mode)
        r.__enter__()
        got = []
        deadline = time.monotonic() + wait
        while len(got) < count and time.monotonic() < deadline:
            remaining = max(0.5, deadline - time.monotonic())
            got += r.receive_messages(max_message_count=count - len(got), max_wait_time=remaining)
        return r, got


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def case_send_receive_complete(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage(b"payload-1", message_id="tx-1", content_type="application/json",
                                  application_properties={"kind": "payment", "attempt": "1"}))
    r, got = ctx.receive(q)
    with r:
        expect(len(got) == 1, f"expected 1 message, got {len(got)}")
        m = got[0]
        expect(m.message_id == "tx-1", f"message_id {m.message_id!r}")
        expect(b"".join(m.body) == b"payload-1", f"body {m.body!r}")
        expect(m.content_type == "application/json", f"content_type {m.content_type!r}")
        props = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                 for k, v in m.application_properties.items()}
        expect(props == {"kind": "payment", "attempt": "1"}, f"properties {props}")
        expect(m.lock_token is not None, "lock token missing")
        expect(m.sequence_number is not None and m.sequence_number >= 1, f"sequence {m.sequence_number}")
        expect(m.enqueued_time_utc is not None, "enqueued time missing")
        expect(m.locked_until_utc is not None and m.locked_until_utc > utcnow(), f"locked_until {m.locked_until_utc}")
        expect(str(m.lock_token) == str(m.raw_amqp_message.annotations.get(b"x-opt-lock-token")),
               "delivery tag lock token differs from x-opt-lock-token")
        r.complete_message(m)
    r, again = ctx.receive(q, wait=1)
    with r:
        expect(again == [], "completed message was delivered again")


def case_abandon_increments_delivery_count(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("x", message_id="ab-1"))
    r, got = ctx.receive(q)
    with r:
        first = got[0].delivery_count
        expect(first == 0, f"first delivery count {first!r} (the SDK reports Service Bus's first delivery as 0)")
        r.abandon_message(got[0])
        more = []
        deadline = time.monotonic() + 5
        while not more and time.monotonic() < deadline:
            more = r.receive_messages(max_message_count=1, max_wait_time=2)
        expect(len(more) == 1, "abandoned message not redelivered")
        expect(more[0].message_id == "ab-1", "wrong message redelivered")
        expect(more[0].delivery_count == first + 1,
               f"delivery count {first} -> {more[0].delivery_count}")
        r.complete_message(more[0])


def case_dead_letter_keeps_reason(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("poison", message_id="dl-1", application_properties={"k": "v"}))
    r, got = ctx.receive(q)
    with r:
        r.dead_letter_message(got[0], reason="DownstreamRejected", error_description="422 from downstream")
    r, dead = ctx.receive(q, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    with r:
        expect(len(dead) == 1, "dead-lettered message not in DLQ")
        d = dead[0]
        expect(d.message_id == "dl-1", f"message_id {d.message_id}")
        expect(d.dead_letter_reason == "DownstreamRejected", f"reason {d.dead_letter_reason!r}")
        expect(d.dead_letter_error_description == "422 from downstream",
               f"description {d.dead_letter_error_description!r}")
        expect(b"".join(d.body) == b"poison", "body changed")
        r.complete_message(d)
    r, main = ctx.receive(q, wait=1)
    with r:
        expect(main == [], "dead-lettered message still in main queue")


def case_peek_dead_letters(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("a", message_id="pk-1"), ServiceBusMessage("b", message_id="pk-2"))
    r, got = ctx.receive(q, count=2)
    with r:
        for m in got:
            r.dead_letter_message(m, reason="Test", error_description="peek")
    with ctx.client.get_queue_receiver(q, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as r:
        peeked = r.peek_messages(max_message_count=10)
        ids = sorted(m.message_id for m in peeked)
        expect(ids == ["pk-1", "pk-2"], f"peeked {ids}")
        expect(all(m.dead_letter_reason == "Test" for m in peeked), "reason missing on peek")
        # The SDK continues browsing after the last peeked message unless told where to start.
        again = r.peek_messages(max_message_count=10, sequence_number=1)
        expect(len(again) == 2, "peek must not consume")
        later = r.peek_messages(max_message_count=10, sequence_number=max(m.sequence_number for m in peeked))
        expect([m.message_id for m in later] == [max(peeked, key=lambda m: m.sequence_number).message_id],
               "peek from sequence number")


def case_lock_expiry_redelivers(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("slow", message_id="le-1"))
    r, got = ctx.receive(q)
    with r:
        expect(len(got) == 1, "not received")
        token = got[0].lock_token
    time.sleep(ctx.lock_secs + 0.5)
    r, again = ctx.receive(q, wait=5)
    with r:
        expect(len(again) == 1, "expired lock did not redeliver")
        expect(again[0].lock_token != token, "lock token not renewed on redelivery")
        expect(again[0].delivery_count == 1, f"delivery count {again[0].delivery_count}")
        r.complete_message(again[0])


def case_max_delivery_count_dead_letters(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("retry", message_id="mx-1"))
    with ctx.client.get_queue_receiver(q) as r:
        for _ in range(ctx.max_delivery):
            got = []
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                got = r.receive_messages(max_message_count=1, max_wait_time=2)
            expect(len(got) == 1, "message vanished before max delivery count")
            r.abandon_message(got[0])
    r, dead = ctx.receive(q, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    with r:
        expect(len(dead) == 1, "not dead-lettered after max delivery count")
        expect(dead[0].dead_letter_reason == "MaxDeliveryCountExceeded", f"reason {dead[0].dead_letter_reason!r}")
        r.complete_message(dead[0])


def case_scheduled_message(ctx):
    q = ctx.queue()
    due = utcnow() + datetime.timedelta(seconds=3)
    ctx.send(q, ServiceBusMessage("later", message_id="sc-1", scheduled_enqueue_time_utc=due))
    r, early = ctx.receive(q, wait=1)
    with r:
        expect(early == [], "scheduled message visible before it was due")
    r, got = ctx.receive(q, wait=6)
    with r:
        expect(len(got) == 1, "scheduled message never became visible")
        expect(utcnow() >= due - datetime.timedelta(milliseconds=200), "delivered early")
        r.complete_message(got[0])


def case_schedule_via_management(ctx):
    q = ctx.queue()
    due = utcnow() + datetime.timedelta(seconds=2)
    with ctx.client.get_queue_sender(q) as s:
        seqs = s.schedule_messages([ServiceBusMessage("m1", message_id="sm-1"),
                                    ServiceBusMessage("m2", message_id="sm-2")], due)
        expect(len(seqs) == 2, f"sequence numbers {seqs}")
        s.cancel_scheduled_messages(seqs[1])
    r, got = ctx.receive(q, count=1, wait=5)
    with r:
        expect([m.message_id for m in got] == ["sm-1"], f"got {[m.message_id for m in got]}")
        r.complete_message(got[0])
    r, rest = ctx.receive(q, wait=1)
    with r:
        expect(rest == [], f"cancelled message delivered: {[m.message_id for m in rest]}")


def case_renew_lock_moves_expiry(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("long", message_id="rl-1"))
    r, got = ctx.receive(q)
    with r:
        m = got[0]
        before = m.locked_until_utc
        time.sleep(1.2)
        after = r.renew_message_lock(m)
        expect(after > before, f"expiry did not move: {before} -> {after}")
        expect(m.locked_until_utc == after, "message locked_until not updated")
        time.sleep(ctx.lock_secs - 0.5)
        r.complete_message(m)  # would fail if the original lock had expired


def case_complete_after_lock_expiry_fails(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("x", message_id="ll-1"))
    r, got = ctx.receive(q)
    with r:
        time.sleep(ctx.lock_secs + 0.5)
        try:
            r.renew_message_lock(got[0])
        except MessageLockLostError:
            pass
        else:
            raise AssertionError("renewing an expired lock succeeded")


def case_batch_send(ctx):
    q = ctx.queue()
    with ctx.client.get_queue_sender(q) as s:
        batch = s.create_message_batch()
        for i in range(5):
            batch.add_message(ServiceBusMessage(f"b{i}", message_id=f"bt-{i}", application_properties={"i": str(i)}))
        s.send_messages(batch)
    r, got = ctx.receive(q, count=5)
    with r:
        expect(sorted(m.message_id for m in got) == [f"bt-{i}" for i in range(5)], f"got {[m.message_id for m in got]}")
        seqs = [m.sequence_number for m in got]
        expect(len(set(seqs)) == 5, "sequence numbers not distinct")
        for m in got:
            r.complete_message(m)


def case_duplicate_detection(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("one", message_id="dup-1"))
    ctx.send(q, ServiceBusMessage("again", message_id="dup-1"))
    ctx.send(q, ServiceBusMessage("other", message_id="dup-2"))
    r, got = ctx.receive(q, count=3, wait=2)
    with r:
        ids = sorted(m.message_id for m in got)
        expect(ids == ["dup-1", "dup-2"], f"got {ids}")
        first = [m for m in got if m.message_id == "dup-1"][0]
        expect(b"".join(first.body) == b"one", "duplicate replaced the original")
        for m in got:
            r.complete_message(m)


def case_duplicate_detection_inside_batches(ctx):
    """Duplicate detection is per message id, also for messages that arrive
    in one batch (format 0x80013700): within a batch and across batches."""
    q = ctx.queue()
    with ctx.client.get_queue_sender(q) as s:
        first = s.create_message_batch()
        first.add_message(ServiceBusMessage("one", message_id="bd-1"))
        first.add_message(ServiceBusMessage("two", message_id="bd-2"))
        first.add_message(ServiceBusMessage("one again", message_id="bd-1"))
        s.send_messages(first)
        second = s.create_message_batch()
        second.add_message(ServiceBusMessage("two again", message_id="bd-2"))
        second.add_message(ServiceBusMessage("three", message_id="bd-3"))
        s.send_messages(second)
    r, got = ctx.receive(q, count=5, wait=2)
    with r:
        ids = sorted(m.message_id for m in got)
        expect(ids == ["bd-1", "bd-2", "bd-3"], f"got {ids}")
        bodies = {m.message_id: b"".join(m.body) for m in got}
        expect(bodies == {"bd-1": b"one", "bd-2": b"two", "bd-3": b"three"},
               f"a duplicate replaced the original: {bodies}")
        for m in got:
            r.complete_message(m)


def case_receive_and_delete(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("gone", message_id="rd-1"))
    r, got = ctx.receive(q, mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)
    with r:
        expect([m.message_id for m in got] == ["rd-1"], "not received")
    r, again = ctx.receive(q, wait=1)
    with r:
        expect(again == [], "receive-and-delete left the message")


CASES = [
    case_send_receive_complete,
    case_abandon_increments_delivery_count,
    case_dead_letter_keeps_reason,
    case_peek_dead_letters,
    case_lock_expiry_redelivers,
    case_max_delivery_count_dead_letters,
    case_scheduled_message,
    case_schedule_via_management,
    case_renew_lock_moves_expiry,
    case_complete_after_lock_expiry_fails,
    case_batch_send,
    case_duplicate_detection,
    case_duplicate_detection_inside_batches,
    case_receive_and_delete,
]


def case_unknown_queue_is_not_found(ctx):
    # The broker is strict, as Service Bus: no queue is created on first use.
    try:
        ctx.send("conf-missing-" + uuid.uuid4().hex[:6], ServiceBusMessage("x"))
    except MessagingEntityNotFoundError:
        return
    raise AssertionError("sending to an unknown queue succeeded")


def case_large_message_crosses_frames(ctx):
    # 200 KB travels in several 64 KiB frames both ways (the service's max-frame-size).
    q = ctx.queue()
    body = os.urandom(200 * 1024)
    ctx.send(q, ServiceBusMessage(body, message_id="big-1"))
    r, got = ctx.receive(q)
    with r:
        expect(len(got) == 1 and b"".join(got[0].body) == body, "large body changed")
        r.complete_message(got[0])


def case_message_size_limit_is_advertised(ctx):
    q = ctx.queue()
    with ctx.client.get_queue_sender(q) as s:
        try:
            s.send_messages(ServiceBusMessage(b"x" * (300 * 1024)))
        except MessageSizeExceededError:
            return
    raise AssertionError("a 300 KB message was sent over a 256 KiB link")


def case_message_id_over_128_is_refused(ctx):
    q = ctx.queue()
    long_id = "i" * 129
    try:
        ctx.send(q, AmqpAnnotatedMessage(data_body=b"x", properties={"message_id": long_id}))
    except ServiceBusError as e:
        expect("128" in str(e), f"refusal does not name the limit: {e}")
    else:
        raise AssertionError("a 129-character message id was accepted")
    ctx.send(q, AmqpAnnotatedMessage(data_body=b"x", properties={"message_id": "i" * 128}))
    r, got = ctx.receive(q)
    with r:
        expect([m.message_id for m in got] == ["i" * 128], "128-character id not delivered")
        r.complete_message(got[0])


def case_dead_letter_fields_over_4096_are_refused(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("poison", message_id="dlf-1"))
    r, got = ctx.receive(q)
    with r:
        try:
            r.dead_letter_message(got[0], reason="R", error_description="d" * 4097)
        except ServiceBusError:
            pass
        else:
            raise AssertionError("a 4,097-character dead-letter description was accepted")
    # Refused, the message kept its lock (the SDK closed that receiver): it comes back.
    r, again = ctx.receive(q, wait=ctx.lock_secs + 3)
    with r:
        expect([m.message_id for m in again] == ["dlf-1"], "the refused dead-letter changed the message")
        r.dead_letter_message(again[0], reason="R", error_description="d" * 4096)
    r, dead = ctx.receive(q, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    with r:
        expect(len(dead) == 1 and len(dead[0].dead_letter_error_description) == 4096, "not dead-lettered")
        r.complete_message(dead[0])


def case_server_busy_is_retried_by_the_sdk(ctx):
    q = ctx.queue()
    ctx.broker.control("reject-transfers 1 com.microsoft:server-busy")
    ctx.send(q, ServiceBusMessage("busy", message_id="busy-1"))
    r, got = ctx.receive(q, count=2, wait=2)
    with r:
        expect([m.message_id for m in got] == ["busy-1"], f"got {[m.message_id for m in got]}")
        r.complete_message(got[0])


def case_management_503_is_retried_by_the_sdk(ctx):
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("p", message_id="mg-1"))
    ctx.broker.control("fail-management 1 503")
    with ctx.client.get_queue_receiver(q) as r:
        peeked = r.peek_messages(max_message_count=5)
        expect([m.message_id for m in peeked] == ["mg-1"], f"peeked {[m.message_id for m in peeked]}")


def case_forced_detach_of_every_link_is_survived(ctx):
    q = ctx.queue()
    with ctx.client.get_queue_sender(q) as s:
        s.send_messages(ServiceBusMessage("a", message_id="fd-1"))
        ctx.broker.control("detach all")
        time.sleep(0.3)
        s.send_messages(ServiceBusMessage("b", message_id="fd-2"))
    r, got = ctx.receive(q, count=2)
    with r:
        expect(sorted(m.message_id for m in got) == ["fd-1", "fd-2"], f"got {[m.message_id for m in got]}")
        for m in got:
            r.complete_message(m)


def case_idle_links_are_detached_and_settled_through_management(ctx):
    b = ctx.brokers("timers")
    q = ctx.queue(b)
    with b.client() as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("a", message_id="idle-1"))
            time.sleep(LINK_IDLE_SECS + 1)  # the sender link is force-detached meanwhile
            s.send_messages(ServiceBusMessage("b", message_id="idle-2"))
        with client.get_queue_receiver(q) as r:
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                got += r.receive_messages(max_message_count=2 - len(got), max_wait_time=1)
            expect(sorted(m.message_id for m in got) == ["idle-1", "idle-2"], f"got {[m.message_id for m in got]}")
            time.sleep(LINK_IDLE_SECS + 1)  # the receiving link is gone: the SDK settles by lock token
            for m in got:
                r.complete_message(m)
    expect(b.control(f"counts {q}") == "0 0", "messages completed after the detach are still there")


def case_expired_token_detaches_links(ctx):
    b = ctx.broker
    q = ctx.queue()
    expiry = int(time.time()) + 3
    token = sas_token(f"sb://{b.addr}/{q}", "RootManageSharedAccessKey", KEY, expiry)
    conn = f"Endpoint=sb://{b.addr};SharedAccessSignature={token};UseDevelopmentEmulator=true;"
    with b.client(conn) as client, client.get_queue_sender(q) as s:
        s.send_messages(ServiceBusMessage("a"))
        time.sleep(4)
        try:
            s.send_messages(ServiceBusMessage("b"))
        except (ServiceBusAuthenticationError, ServiceBusAuthorizationError, ServiceBusError):
            return
    raise AssertionError("a link outlived its token")


def case_token_for_another_queue_is_refused(ctx):
    b = ctx.broker
    q = ctx.queue()
    token = sas_token(f"sb://{b.addr}/other-queue", "RootManageSharedAccessKey", KEY, int(time.time()) + 300)
    conn = f"Endpoint=sb://{b.addr};SharedAccessSignature={token};UseDevelopmentEmulator=true;"
    with b.client(conn) as client:
        try:
            with client.get_queue_sender(q) as s:
                s.send_messages(ServiceBusMessage("a"))
        except (ServiceBusAuthenticationError, ServiceBusAuthorizationError, ServiceBusError):
            return
    raise AssertionError("a token for another queue was accepted")


def case_send_right_does_not_allow_listen(ctx):
    b = ctx.broker
    q = ctx.queue()
    with b.client(b.connection_string("sender", "SENDER_KEY")) as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("a", message_id="rt-1"))
        try:
            with client.get_queue_receiver(q) as r:
                got = r.receive_messages(max_message_count=1, max_wait_time=1)
                expect(got == [], "a Send-only policy received a message")
        except (ServiceBusAuthorizationError, ServiceBusAuthenticationError, ServiceBusError) as e:
            expect("Listen" in str(e), f"refusal does not name the Listen claim: {e}")
        else:
            raise AssertionError("a Send-only policy opened a receiver")
    r, got = ctx.receive(q)
    with r:
        expect([m.message_id for m in got] == ["rt-1"], "the Send-only policy's message is missing")
        r.complete_message(got[0])


def case_clock_offset_shows_in_lock_times(ctx):
    b = ctx.brokers("offset")
    q = ctx.queue(b)
    with b.client() as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("t", message_id="co-1"))
        with client.get_queue_receiver(q) as r:
            got = r.receive_messages(max_message_count=1, max_wait_time=5)
            expect(len(got) == 1, "not received")
            ahead = (got[0].locked_until_utc - utcnow()).total_seconds()
            expected = LOCK_SECS + CLOCK_OFFSET_MS / 1000
            expect(abs(ahead - expected) < 2, f"locked until {ahead:.1f}s ahead, expected about {expected}s")
            r.complete_message(got[0])


def case_tls_on_connect(ctx):
    b = ctx.brokers("tls")
    q = ctx.queue(b)
    with b.client() as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("over tls", message_id="tls-1"))
        with client.get_queue_receiver(q) as r:
            got = r.receive_messages(max_message_count=1, max_wait_time=5)
            expect([m.message_id for m in got] == ["tls-1"], "not received over TLS")
            r.complete_message(got[0])
    # A client that opens with the cleartext AMQP header is refused, as on 5671.
    with socket.create_connection(("127.0.0.1", b.port), timeout=5) as raw:
        raw.sendall(b"AMQP\x00\x01\x00\x00")
        try:
            answer = raw.recv(8)
        except ConnectionResetError:
            answer = b""
        expect(answer == b"", f"the TLS listener answered a cleartext AMQP header: {answer!r}")


def case_amqp_over_websockets(ctx):
    b = ctx.brokers("websockets")
    q = ctx.queue(b)
    with b.client(transport_type=TransportType.AmqpOverWebsocket) as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("over wss", message_id="ws-1"))
        with client.get_queue_receiver(q) as r:
            got = r.receive_messages(max_message_count=1, max_wait_time=5)
            expect([m.message_id for m in got] == ["ws-1"], "not received over WebSockets")
            r.complete_message(got[0])


def case_timeout_rejection_is_retried_by_the_sdk(ctx):
    q = ctx.queue()
    ctx.broker.control("reject-transfers 1 com.microsoft:timeout")
    ctx.send(q, ServiceBusMessage("t", message_id="timeout-1"))
    r, got = ctx.receive(q, count=2, wait=2)
    with r:
        expect([m.message_id for m in got] == ["timeout-1"], f"got {[m.message_id for m in got]}")
        r.complete_message(got[0])


def case_resource_limit_rejection_is_an_error(ctx):
    q = ctx.queue()
    # Enough for every retry the SDK makes, if it makes any.
    ctx.broker.control("reject-transfers 10 amqp:resource-limit-exceeded")
    try:
        ctx.send(q, ServiceBusMessage("full", message_id="quota-1"))
    except ServiceBusError as e:
        expect("resource-limit" in str(e).lower() or "quota" in type(e).__name__.lower(),
               f"the refusal is not named: {type(e).__name__}: {e}")
    else:
        raise AssertionError("a send the service refused for its quota was reported as sent")
    finally:
        # Take back the injected refusals the SDK did not use up.
        ctx.broker.control("clear-faults")
    expect(ctx.broker.control(f"counts {q}") == "0 0", "a refused message was stored")


def case_headers_over_64_kib_are_refused(ctx):
    q = ctx.queue()
    big = ServiceBusMessage("h", message_id="hdr-1", application_properties={"big": "x" * (70 * 1024)})
    try:
        ctx.send(q, big)
    except ServiceBusError:
        pass
    else:
        raise AssertionError("a message with 70 KiB of headers was accepted")
    ok = ServiceBusMessage("h", message_id="hdr-2", application_properties={"big": "x" * (60 * 1024)})
    ctx.send(q, ok)
    r, got = ctx.receive(q)
    with r:
        expect([m.message_id for m in got] == ["hdr-2"], f"got {[m.message_id for m in got]}")
        r.complete_message(got[0])


def case_connection_without_links_is_closed_and_reopened(ctx):
    b = ctx.brokers("timers")
    q = ctx.queue(b)
    with b.client() as client:
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("a", message_id="cidle-1"))
        before = int(b.control("connections"))
        time.sleep(4)  # no link for longer than the broker's 3 s: the connection is closed
        with client.get_queue_sender(q) as s:
            s.send_messages(ServiceBusMessage("b", message_id="cidle-2"))
        expect(int(b.control("connections")) > before, "the SDK reused a connection the broker closed")
        with client.get_queue_receiver(q) as r:
            got = []
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                got += r.receive_messages(max_message_count=2 - len(got), max_wait_time=1)
            expect(sorted(m.message_id for m in got) == ["cidle-1", "cidle-2"], f"got {[m.message_id for m in got]}")
            for m in got:
                r.complete_message(m)


def case_short_receives_on_a_long_round_trip(ctx):
    # Every broker frame 200 ms late: flow replies (drains) arrive after the
    # next receive has begun, as on a distant region.
    b = ctx.brokers("delay")
    q = ctx.queue(b)
    with b.client() as client:
        with client.get_queue_receiver(q) as r:
            expect(r.receive_messages(max_message_count=5, max_wait_time=1) == [], "the queue is empty")
            with client.get_queue_sender(q) as s:
                s.send_messages([ServiceBusMessage(str(i), message_id=f"rtt-{i}") for i in range(5)])
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 5 and time.monotonic() < deadline:
                got += r.receive_messages(max_message_count=5 - len(got), max_wait_time=2)
            expect(sorted(m.message_id for m in got) == [f"rtt-{i}" for i in range(5)],
                   f"got {[m.message_id for m in got]}")
            for m in got:
                r.complete_message(m)
    expect(b.control(f"counts {q}") == "0 0", "messages left behind")


def case_dropped_connections_are_survived(ctx):
    q = ctx.queue()
    with ctx.client.get_queue_sender(q) as s:
        s.send_messages(ServiceBusMessage("a", message_id="drop-1"))
        ctx.broker.control("drop-connections")
        time.sleep(0.5)
        s.send_messages(ServiceBusMessage("b", message_id="drop-2"))
    r, got = ctx.receive(q, count=2)
    with r:
        expect(sorted(m.message_id for m in got) == ["drop-1", "drop-2"], f"got {[m.message_id for m in got]}")
        for m in got:
            r.complete_message(m)



def case_refused_attach_is_retried_by_the_sdk(ctx):
    # A busy answer to an attach is about that link: the SDK retries it.
    q = ctx.queue()
    ctx.send(q, ServiceBusMessage("a", message_id="ra-1"))
    ctx.broker.control("refuse-attaches 1 com.microsoft:server-busy")
    try:
        r, got = ctx.receive(q, count=1, wait=30)
    finally:
        ctx.broker.control("clear-faults")
    with r:
        expect([m.message_id for m in got] == ["ra-1"], f"got {[m.message_id for m in got]}")
        r.complete_message(got[0])


def sas_token(uri, key_name, key, expiry):
    resource = urllib.parse.quote_plus(uri)
    digest = hmac.new(key.encode(), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = urllib.parse.quote_plus(base64.b64encode(digest))
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={key_name}"


CASES += [
    case_unknown_queue_is_not_found,
    case_large_message_crosses_frames,
    case_message_size_limit_is_advertised,
    case_message_id_over_128_is_refused,
    case_dead_letter_fields_over_4096_are_refused,
    case_server_busy_is_retried_by_the_sdk,
    case_management_503_is_retried_by_the_sdk,
    case_forced_detach_of_every_link_is_survived,
    case_idle_links_are_detached_and_settled_through_management,
    case_expired_token_detaches_links,
    case_token_for_another_queue_is_refused,
    case_send_right_does_not_allow_listen,
    case_clock_offset_shows_in_lock_times,
    case_tls_on_connect,
    case_amqp_over_websockets,
    case_timeout_rejection_is_retried_by_the_sdk,
    case_resource_limit_rejection_is_an_error,
    case_headers_over_64_kib_are_refused,
    case_connection_without_links_is_closed_and_reopened,
    case_short_receives_on_a_long_round_trip,
    case_dropped_connections_are_survived,
    case_refused_attach_is_retried_by_the_sdk,
]

# Extra broker instances, started on first use.
PROFILES = {
    # Locks outlive the idle timer here, so settling after a detach is still in time.
    "timers": (["--link-idle-timeout-secs", str(LINK_IDLE_SECS), "--connection-idle-timeout-secs", "3"], 30),
    "offset": (["--clock-offset-ms", str(CLOCK_OFFSET_MS)], LOCK_SECS),
    "tls": (["--tls"], LOCK_SECS),
    "websockets": (["--tls", "--websockets"], LOCK_SECS),
    "delay": (["--write-delay-ms", "200"], 30),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker-bin", default=os.environ.get("SB_TEST_BROKER_BIN", "target/debug/sb-test-broker"))
    p.add_argument("-k", dest="only", help="run only cases whose name contains this")
    a = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="sb-conformance-")
    started = {}

    def brokers(profile):
        if profile not in started:
            extra, lock_secs = PROFILES[profile]
            started[profile] = Broker(a.broker_bin, extra, tmp, lock_secs)
        return started[profile]

    main_broker = Broker(a.broker_bin, ["--sas-rule", "sender:SENDER_KEY:send"], tmp)
    passed = failed = 0
    try:
        with main_broker.client() as client:
            ctx = Ctx(client, LOCK_SECS, MAX_DELIVERY, main_broker, brokers)
            for case in CASES:
                name = case.__name__[len("case_"):]
                if a.only and a.only not in name:
                    continue
                t0 = time.monotonic()
                try:
                    case(ctx)
                    passed += 1
                    print(f"PASS {name} ({time.monotonic() - t0:.1f}s)", flush=True)
                except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
                    failed += 1
                    print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                    if os.environ.get("SB_CONFORMANCE_TRACE"):
                        traceback.print_exc()
    finally:
        main_broker.stop()
        for b in started.values():
            b.stop()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
