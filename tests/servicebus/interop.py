#!/usr/bin/env python3
"""Interop with Microsoft's Python SDK (azure-servicebus), for Rust tests.

  interop.py send --connection-string CS --queue Q --message-id ID --body TEXT
                  [--content-type CT] [--property k=v ...]
      Sends one message with the official SDK.

  interop.py receive-check --connection-string CS --queue Q --message-id ID --body TEXT
                  [--content-type CT] [--property k=v ...] [--wait SECS] [--some-properties]
      Receives one message (peek-lock) with the official SDK, checks id, body,
      content type and application properties (all of them, or with
      --some-properties only those named), completes it on success and
      abandons it otherwise. Prints `ok` or `mismatch: ...`; exit code 0 only
      when everything matched.

The connection string is the broker's (`BrokerHandle::connection_string()`),
e.g. `Endpoint=sb://127.0.0.1:PORT;SharedAccessKeyName=RootManageSharedAccessKey;
SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;`.
"""

import argparse
import sys

from azure.servicebus import ServiceBusClient, ServiceBusMessage


def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def parse_properties(pairs):
    out = {}
    for p in pairs or []:
        k, _, v = p.partition("=")
        out[k] = v
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["send", "receive-check"])
    p.add_argument("--connection-string", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--message-id", required=True)
    p.add_argument("--body", required=True)
    p.add_argument("--content-type")
    p.add_argument("--property", action="append", default=[])
    p.add_argument("--wait", type=float, default=10.0)
    p.add_argument("--some-properties", action="store_true")
    a = p.parse_args()
    props = parse_properties(a.property)

    with ServiceBusClient.from_connection_string(a.connection_string) as client:
        if a.mode == "send":
            with client.get_queue_sender(a.queue) as s:
                s.send_messages(ServiceBusMessage(a.body.encode(), message_id=a.message_id,
                                                  content_type=a.content_type,
                                                  application_properties=props or None))
            print("sent")
            return 0
        with client.get_queue_receiver(a.queue) as r:
            got = r.receive_messages(max_message_count=1, max_wait_time=a.wait)
            if not got:
                print("mismatch: no message received")
                return 1
            m = got[0]
            problems = []
            if m.message_id != a.message_id:
                problems.append(f"message_id {m.message_id!r} != {a.message_id!r}")
            body = b"".join(m.body)
            if body != a.body.encode():
                problems.append(f"body {body!r} != {a.body.encode()!r}")
            if a.content_type is not None and m.content_type != a.content_type:
                problems.append(f"content_type {m.content_type!r} != {a.content_type!r}")
            received = {text(k): text(v) for k, v in (m.application_properties or {}).items()}
            if a.some_properties:
                received = {k: v for k, v in received.items() if k in props}
            if received != props:
                problems.append(f"properties {received} != {props}")
            if m.lock_token is None or m.sequence_number is None:
                problems.append("lock token or sequence number missing")
            if problems:
                r.abandon_message(m)
                print("mismatch: " + "; ".join(problems))
                return 1
            r.complete_message(m)
            print("ok")
            return 0


if __name__ == "__main__":
    sys.exit(main())
