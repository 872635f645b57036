#!/usr/bin/env python3
"""Service Bus fidelity of the in-repo test broker, judged by Microsoft's
official Python SDK (azure-servicebus).

Starts `sb-test-broker` itself (path from --broker-bin or $SB_TEST_BROKER_BIN,
default target/debug/sb-test-broker) on a free port with short lock settings,
or uses --connection-string for a broker that is already running (then pass
the same --lock-duration-secs / --max-delivery-count it runs with).

Prints one line per case and ends with `N passed, M failed`; exits non-zero on
any failure. Every case uses its own queue (the broker creates queues on first
use), so cases do not see each other's messages.
"""

import argparse
import datetime
import os
import subprocess
import sys
import time
import traceback
import uuid

from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.exceptions import MessageLockLostError

LOCK_SECS = 3
MAX_DELIVERY = 3
DUP_WINDOW_SECS = 60


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


class Ctx:
    def __init__(self, client, lock_secs, max_delivery):
        self.client = client
        self.lock_secs = lock_secs
        self.max_delivery = max_delivery

    def queue(self):
        return "conf-" + uuid.uuid4().hex[:10]

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
    case_receive_and_delete,
]


def start_broker(binary, sas_key):
    args = [binary, "--port", "0", "--lock-duration-secs", str(LOCK_SECS),
            "--max-delivery-count", str(MAX_DELIVERY), "--duplicate-window-secs", str(DUP_WINDOW_SECS),
            "--sas-key", sas_key]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"broker did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker-bin", default=os.environ.get("SB_TEST_BROKER_BIN", "target/debug/sb-test-broker"))
    p.add_argument("--connection-string", default=os.environ.get("SB_CONNECTION_STRING"))
    p.add_argument("--lock-duration-secs", type=int, default=LOCK_SECS)
    p.add_argument("--max-delivery-count", type=int, default=MAX_DELIVERY)
    p.add_argument("-k", dest="only", help="run only cases whose name contains this")
    a = p.parse_args()

    proc = None
    conn_str = a.connection_string
    if not conn_str:
        key = "SAS_KEY_VALUE"
        proc, addr = start_broker(a.broker_bin, key)
        conn_str = (f"Endpoint=sb://{addr};SharedAccessKeyName=RootManageSharedAccessKey;"
                    f"SharedAccessKey={key};UseDevelopmentEmulator=true;")
    passed = failed = 0
    try:
        with ServiceBusClient.from_connection_string(conn_str) as client:
            ctx = Ctx(client, a.lock_duration_secs, a.max_delivery_count)
            for case in CASES:
                name = case.__name__[len("case_"):]
                if a.only and a.only not in name:
                    continue
                started = time.monotonic()
                try:
                    case(ctx)
                    passed += 1
                    print(f"PASS {name} ({time.monotonic() - started:.1f}s)", flush=True)
                except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
                    failed += 1
                    print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
                    if os.environ.get("SB_CONFORMANCE_TRACE"):
                        traceback.print_exc()
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=5)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
