#!/usr/bin/env python3
"""Receive latentloop's decoded bins (its `[output] endpoint`, a PUB socket).

Every message is decoded (LLOT schema, docs/WIRE.md) and printed, one line per bin, or
saved to an .npz with one row per bin: seq, flags, dropped_before, source_ts, recv_ns,
publish_ns, client_ns (this script's CLOCK_MONOTONIC receive time), kl, behavior (T x D),
latent (T x L), lag1 (T x L). `recv_ns`, `publish_ns` and `client_ns` share one clock, so
`client_ns - recv_ns` is the latency from the bin's arrival at latentloop to its decoded
output's arrival here.

latentloop binds; this script connects (and reconnects if latentloop restarts). With
--ready it prints "ready" on stdout once the connection is up, so a script can wait for it
before starting the bins (ZeroMQ drops what a PUB sends before a subscriber is connected).

Examples:
    python3 receive_outputs.py                                  # print until Ctrl-C
    python3 receive_outputs.py --count 5000 --save out.npz --quiet
    python3 receive_outputs.py --endpoint ipc:///tmp/ll-out --seconds 10

Needs numpy and pyzmq only.
"""

import argparse
import os
import signal
import sys
import time

import numpy as np
import zmq
import zmq.utils.monitor

try:
    from latentloop import wire
except ImportError:  # not installed: use the package in this checkout (<repo>/python)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    from latentloop import wire  # noqa: E402


def wait_connected(sock, mon, timeout_s):
    """True once the socket's handshake with a peer has succeeded (ZeroMQ >= 4.3); `mon` is
    the socket's monitor, started before `connect` so that the event cannot be missed."""
    try:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if mon.poll(int(min(left, 0.2) * 1000) + 1):
                ev = zmq.utils.monitor.recv_monitor_message(mon)
                if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return True
        return False
    finally:
        sock.disable_monitor()
        mon.close(0)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Subscribe to latentloop's output (LLOT schema, docs/WIRE.md), decode every "
                    "message, print it or save all of them to an .npz.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5560",
                   help="latentloop's [output] endpoint (connect)")
    p.add_argument("--count", type=int, help="stop after this many messages")
    p.add_argument("--seconds", type=float, help="stop after this many seconds")
    p.add_argument("--idle", type=float,
                   help="stop when nothing arrived for this many seconds (after the first message)")
    p.add_argument("--save", help="write every decoded message to this .npz")
    p.add_argument("--quiet", action="store_true", help="no line per message")
    p.add_argument("--ready", action="store_true",
                   help='print "ready" on stdout once connected to latentloop')
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="with --ready: give up if not connected within this many seconds")
    p.add_argument("--rcvhwm", type=int, default=100000, help="messages ZeroMQ may queue here")
    a = p.parse_args(argv)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, a.rcvhwm)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED) if a.ready else None
    sock.connect(a.endpoint)
    if a.ready:
        if not wait_connected(sock, mon, a.connect_timeout):
            print(f"receive_outputs: no connection to {a.endpoint} within {a.connect_timeout} s",
                  file=sys.stderr)
            return 1
        print("ready", flush=True)

    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rows = []
    t_end = None if a.seconds is None else time.monotonic() + a.seconds
    last = None
    while not stop and (a.count is None or len(rows) < a.count):
        now = time.monotonic()
        if t_end is not None and now >= t_end:
            break
        if a.idle is not None and last is not None and now - last >= a.idle:
            break
        if not sock.poll(50):
            continue
        msg = sock.recv()
        client_ns = time.monotonic_ns()
        last = time.monotonic()
        try:
            o = wire.decode_output(msg)
        except wire.WireError as e:
            print(f"receive_outputs: skipped a message: {e}", file=sys.stderr)
            continue
        o["client_ns"] = client_ns
        rows.append(o)
        if not a.quiet:
            print(f"seq {o['seq']:>8} {wire.flag_names(o['flags']):<22} dropped {o['dropped_before']:>3} "
                  f"latency {(client_ns - o['recv_ns']) / 1e3:9.1f} us  behavior "
                  + " ".join(f"{v:+.4f}" for v in o["behavior"]), flush=True)

    if a.save:
        save(a.save, rows)
    lat = np.array([r["client_ns"] - r["recv_ns"] for r in rows]) / 1e3
    gaps = sum(1 for r in rows if r["flags"] & wire.FLAG_GAP)
    summary = f"receive_outputs: {len(rows)} messages, {gaps} with GAP, " \
              f"{sum(r['dropped_before'] for r in rows)} bins dropped before them"
    if len(lat):
        summary += f"; bin arrival -> here p50 {np.percentile(lat, 50):.0f} us, max {lat.max():.0f} us"
    print(summary, file=sys.stderr)
    sock.close()
    ctx.term()
    return 0


def save(path, rows):
    def col(key, dtype):
        return np.array([r[key] for r in rows], dtype)

    def mat(key):
        width = len(rows[0][key]) if rows else 0
        return np.array([r[key] for r in rows], np.float32).reshape(len(rows), width)

    np.savez(
        path,
        seq=col("seq", np.uint64),
        flags=col("flags", np.uint16),
        dropped_before=col("dropped_before", np.uint32),
        source_ts=col("source_ts", np.uint64),
        recv_ns=col("recv_ns", np.uint64),
        publish_ns=col("publish_ns", np.uint64),
        client_ns=col("client_ns", np.uint64),
        kl=col("kl", np.float32),
        behavior=mat("behavior"),
        latent=mat("latent"),
        lag1=mat("lag1"),
    )


if __name__ == "__main__":
    sys.exit(main())
