#!/usr/bin/env python3
"""Publish binned spike counts to latentloop (its `[source] kind = "zmq"` input).

This script binds; latentloop's SUB socket connects to the endpoint named in its rig
config (`[source.zmq] endpoint`). Bins come from an .npz (`spikes`, T x N, and optionally
`behavior`, T x D, e.g. written by `latentloop simulate`) or are random Poisson counts. They
are sent at a fixed rate with absolute-deadline pacing (bin k is due at t0 + k / rate, so
lateness never accumulates), numbered from --start-seq with the stream-start flag on the
first bin, and the CLOCK_MONOTONIC time of every send is recorded (--times) so latency can
be measured against the `recv_ns` / `publish_ns` stamps of latentloop's output.

ZeroMQ drops what a PUB socket sends before a subscriber has connected ("slow joiner").
This script therefore binds an XPUB socket (wire-compatible with PUB) and, by default,
waits until latentloop's subscription arrives before sending the first bin.

Examples:
    latentloop simulate --system lorenz --neurons 50 --bins 5000 --dt 0.001 --out s.npz
    python3 send_bins.py --npz s.npz --rate 1000 --times sends.csv
    python3 send_bins.py --random 128 --rate 1000 --seconds 30 --endpoint tcp://127.0.0.1:5555

Needs numpy and pyzmq only.
"""

import argparse
import os
import signal
import sys
import time

import numpy as np
import zmq

try:
    from latentloop import wire
except ImportError:  # not installed: use the package in this checkout (<repo>/python)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    from latentloop import wire  # noqa: E402


def wait_subscriber(sock, timeout_s):
    """Blocks until a subscriber's subscription arrives on the XPUB socket (True), or the
    timeout passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if sock.poll(int(min(left, 0.2) * 1000) + 1, zmq.POLLIN):
            msg = sock.recv()
            if msg[:1] == b"\x01":  # a subscription (b"\x00..." is an unsubscription)
                return True


def sleep_until(deadline_ns, spin_ns):
    """Sleeps until `spin_ns` before the deadline, then busy-waits to it."""
    while True:
        left = deadline_ns - time.monotonic_ns()
        if left <= 0:
            return
        if left > spin_ns:
            time.sleep((left - spin_ns) / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Publish latentloop bins (LLBN schema, docs/WIRE.md) on a bound XPUB/PUB socket, "
                    "paced at a fixed rate, recording the send time of every bin.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="session file with spikes (T x N) and optional behavior (T x D)")
    src.add_argument("--random", type=int, metavar="N", help="random Poisson counts for N channels")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555",
                   help="endpoint to bind (latentloop's [source.zmq] endpoint)")
    p.add_argument("--rate", type=float, default=1000.0, help="bins per second")
    p.add_argument("--bins", type=int, help="bins to send (default: every row of --npz; "
                                            "unlimited for --random unless --seconds)")
    p.add_argument("--seconds", type=float, help="stop after this many seconds of sending")
    p.add_argument("--loop", action="store_true", help="repeat the .npz rows until --bins/--seconds")
    p.add_argument("--mean-count", type=float, default=0.5, help="--random: mean count per channel and bin")
    p.add_argument("--seed", type=int, default=0, help="--random: generator seed")
    p.add_argument("--dtype", choices=sorted(wire.DTYPES), default="u16", help="wire dtype of the counts")
    p.add_argument("--no-behavior", action="store_true", help="do not send the .npz behavior with each bin")
    p.add_argument("--start-seq", type=int, default=0, help="sequence number of the first bin")
    p.add_argument("--no-stream-start", action="store_true",
                   help="do not set the stream-start flag on the first bin")
    p.add_argument("--wait-subscriber", type=float, default=30.0, metavar="SECONDS",
                   help="wait up to this long for latentloop to subscribe before sending (0: do not wait)")
    p.add_argument("--start-delay", type=float, default=0.1,
                   help="seconds to wait after the subscription, before the first bin")
    p.add_argument("--spin-us", type=float, default=200.0,
                   help="busy-wait this long before each deadline (precision at the cost of a core)")
    p.add_argument("--sndhwm", type=int, default=100000, help="messages ZeroMQ may queue")
    p.add_argument("--times", help="write seq, deadline_ns, send_ns per bin here (.csv, or .npz)")
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    a = p.parse_args(argv)
    if a.rate <= 0:
        p.error("--rate must be positive")

    if a.npz:
        with np.load(a.npz) as f:
            spikes = np.asarray(f["spikes"])
            behavior = None if a.no_behavior or "behavior" not in f else np.asarray(f["behavior"], np.float32)
        if spikes.ndim != 2:
            p.error(f"{a.npz}: spikes must be T x N, got shape {spikes.shape}")
        rows = spikes.shape[0]
        total = a.bins if a.bins is not None else (None if a.loop else rows)
        if not a.loop and total is not None and total > rows:
            p.error(f"--bins {total} but {a.npz} has {rows} rows (add --loop)")
        rng = None
    else:
        spikes, behavior, rows = None, None, 0
        total = a.bins
        rng = np.random.default_rng(a.seed)

    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, a.sndhwm)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(a.endpoint)
    if a.wait_subscriber > 0:
        if not a.quiet:
            print(f"send_bins: bound {a.endpoint}, waiting for latentloop to subscribe", file=sys.stderr)
        if not wait_subscriber(sock, a.wait_subscriber):
            print(f"send_bins: nobody subscribed to {a.endpoint} within {a.wait_subscriber} s", file=sys.stderr)
            return 1
    if a.start_delay > 0:
        time.sleep(a.start_delay)

    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    period_ns = int(round(1e9 / a.rate))
    spin_ns = int(a.spin_us * 1000)
    limit_ns = None if a.seconds is None else int(a.seconds * 1e9)
    seqs, deadlines, sends = [], [], []
    t0 = time.monotonic_ns() + period_ns
    k = 0
    late = 0
    while not stop and (total is None or k < total):
        deadline = t0 + k * period_ns
        if limit_ns is not None and deadline - t0 >= limit_ns:
            break
        if spikes is not None:
            row = k % rows
            counts = spikes[row]
            b = None if behavior is None else behavior[row]
        else:
            counts = rng.poisson(a.mean_count, a.random)
            b = None
        seq = a.start_seq + k
        flags = wire.FLAG_STREAM_START if k == 0 and not a.no_stream_start else 0
        msg = wire.encode_bin(seq, counts, source_ts=k, flags=flags, behavior=b, dtype=a.dtype)
        sleep_until(deadline, spin_ns)
        sent = time.monotonic_ns()  # stamped just before the send: a lower bound of latentloop's recv_ns
        sock.send(msg)
        if sent - deadline > period_ns:
            late += 1
        seqs.append(seq)
        deadlines.append(deadline)
        sends.append(sent)
        k += 1

    if a.times:
        write_times(a.times, seqs, deadlines, sends)
    if not a.quiet and sends:
        lag = (np.asarray(sends) - np.asarray(deadlines)) / 1e3
        print(f"send_bins: sent {k} bins at {a.rate:g} Hz in {(sends[-1] - t0) / 1e9:.2f} s; "
              f"send lateness p50 {np.percentile(lag, 50):.0f} us, max {lag.max():.0f} us, "
              f"{late} more than one period late", file=sys.stderr)
    sock.close()
    ctx.term()
    return 0


def write_times(path, seqs, deadlines, sends):
    seqs, deadlines, sends = (np.asarray(x, np.int64) for x in (seqs, deadlines, sends))
    if path.endswith(".npz"):
        np.savez(path, seq=seqs, deadline_ns=deadlines, send_ns=sends)
    else:
        with open(path, "w") as f:
            f.write("seq,deadline_ns,send_ns\n")
            for row in zip(seqs.tolist(), deadlines.tolist(), sends.tolist()):
                f.write("%d,%d,%d\n" % row)


if __name__ == "__main__":
    sys.exit(main())
