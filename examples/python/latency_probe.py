#!/usr/bin/env python3
"""Measure latentloop's end-to-end latency from a client's point of view.

One process plays both ends of the loop: a sender thread publishes random bins at a fixed
rate (absolute-deadline pacing) on a bound XPUB socket, latentloop decodes them, and the
main thread receives the decoded outputs from latentloop's PUB socket. Every timestamp is
CLOCK_MONOTONIC in ns (`time.monotonic_ns()`, the clock latentloop stamps `recv_ns` and
`publish_ns` with), so each bin's journey splits into

    send -> recv_ns        ZeroMQ in (client to latentloop's acquisition thread)
    recv_ns -> publish_ns  latentloop (ring, filter step, encode)
    publish_ns -> client   ZeroMQ out
    send -> client         end to end

The report (JSON, on stdout or --json) gives p50 / p99 / p99.9 / max of each, the deadline
misses (end to end longer than --deadline-us, default one bin period), and what was lost:
bins sent without an output, split into those latentloop reported as skipped or missing
(`dropped_before` of a GAP output) and those lost on the way out. Bins of the first
--warmup seconds are decoded but left out of the statistics.

Example (latentloop running a config whose [source.zmq] endpoint is tcp://127.0.0.1:5555,
channels = 128, [output] endpoint = tcp://127.0.0.1:5560):
    python3 latency_probe.py --channels 128 --rate 1000 --seconds 20 --json probe.json

With --lsl NAME the bins go out as samples of an LSL outlet instead (pylsl; latentloop
running `[source] kind = "lsl"`, shape counts, `[source.lsl] name = NAME`): the same
report, for the same model, so the two inputs can be set side by side
(scripts/measure-lsl.sh). `zmq_in` is then send -> latentloop's receive through liblsl.

Needs numpy and pyzmq (and pylsl for --lsl).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time

import numpy as np
import zmq
import zmq.utils.monitor

try:
    from latentloop import wire
except ImportError:  # not installed: use the package in this checkout (<repo>/python)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
    from latentloop import wire  # noqa: E402


def wait_ready(xpub, mon, timeout_s, outlet=None):
    """Waits for both: latentloop's subscription on our XPUB (its SUB connected; with LSL,
    its inlet on our outlet) and our SUB's handshake with latentloop's PUB. Returns what is
    still missing ('' when ready)."""
    subscribed = outlet is not None and outlet.wait_for_consumers(timeout_s)
    connected = False
    deadline = time.monotonic() + timeout_s
    poller = zmq.Poller()
    poller.register(xpub, zmq.POLLIN)
    poller.register(mon, zmq.POLLIN)
    while not (subscribed and connected) and time.monotonic() < deadline:
        for s, _ in poller.poll(200):
            if s is xpub and xpub.recv()[:1] == b"\x01":
                subscribed = True
            elif s is mon and zmq.utils.monitor.recv_monitor_message(mon)["event"] == \
                    zmq.EVENT_HANDSHAKE_SUCCEEDED:
                connected = True
    missing = []
    if not subscribed:
        missing.append("latentloop never subscribed to the bins endpoint")
    if not connected:
        missing.append("no connection to latentloop's output endpoint")
    return "; ".join(missing)


def percentiles(values_ns):
    v = np.asarray(values_ns, np.float64) / 1e3
    if v.size == 0:
        return None
    return {
        "count": int(v.size),
        "p50_us": float(np.percentile(v, 50)),
        "p99_us": float(np.percentile(v, 99)),
        "p999_us": float(np.percentile(v, 99.9)),
        "max_us": float(v.max()),
        "mean_us": float(v.mean()),
    }


def zmq_send(sock, dtype):
    def send(k, counts):
        sock.send(wire.encode_bin(k, counts, source_ts=k, flags=wire.FLAG_STREAM_START if k == 0 else 0, dtype=dtype))
    return send


def lsl_send(outlet):
    def send(_k, counts):
        outlet.push_sample(counts.astype(np.float32))  # stamped by liblsl at the push
    return send


class Sender(threading.Thread):
    def __init__(self, send, n, rate, channels, mean_count, seed, dtype, spin_ns, stop):
        super().__init__(name="sender", daemon=True)
        self.send, self.n, self.period = send, n, int(round(1e9 / rate))
        self.channels, self.mean_count, self.dtype, self.spin_ns = channels, mean_count, dtype, spin_ns
        self.rng = np.random.default_rng(seed)
        self.stop = stop
        self.deadline_ns = np.zeros(n, np.int64)
        self.send_ns = np.zeros(n, np.int64)
        self.sent = 0
        self.t0 = 0

    def run(self):
        self.t0 = time.monotonic_ns() + self.period
        for k in range(self.n):
            if self.stop.is_set():
                break
            counts = self.rng.poisson(self.mean_count, self.channels)
            deadline = self.t0 + k * self.period
            while (left := deadline - time.monotonic_ns()) > 0:
                if left > self.spin_ns:
                    time.sleep((left - self.spin_ns) / 1e9)
            self.send_ns[k] = time.monotonic_ns()  # just before the send: <= latentloop's recv_ns
            self.send(k, counts)
            self.deadline_ns[k] = deadline
            self.sent = k + 1


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Send paced bins to latentloop and receive its outputs in one process; report "
                    "end-to-end latency percentiles, deadline misses and lost bins as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--channels", type=int, required=True, help="channels per bin (the rig config's)")
    p.add_argument("--in-endpoint", default="tcp://127.0.0.1:5555",
                   help="bins: bind here (latentloop's [source.zmq] endpoint)")
    p.add_argument("--out-endpoint", default="tcp://127.0.0.1:5560",
                   help="outputs: connect here (latentloop's [output] endpoint)")
    p.add_argument("--rate", type=float, default=1000.0, help="bins per second")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of bins left out of the statistics")
    p.add_argument("--deadline-us", type=float, help="end-to-end deadline (default: one bin period)")
    p.add_argument("--mean-count", type=float, default=0.5, help="mean random count per channel and bin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(wire.DTYPES), default="u16")
    p.add_argument("--spin-us", type=float, default=0.0,
                   help="busy-wait this long before each send (holds the GIL: the receiver's stamps "
                        "may then be late by as much)")
    p.add_argument("--drain", type=float, default=0.5, help="seconds to wait for the last outputs")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.add_argument("--json", help="write the report here instead of stdout")
    p.add_argument("--window", type=float, help="also report percentiles per window of this many seconds")
    p.add_argument("--lsl", metavar="NAME", help="send the bins as an LSL outlet of this name (pylsl) "
                   "instead of on --in-endpoint")
    a = p.parse_args(argv)
    if a.rate <= 0 or a.seconds <= 0:
        p.error("--rate and --seconds must be positive")
    sys.setswitchinterval(1e-4)  # the receiver stamps promptly even while the sender runs

    ctx = zmq.Context()
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.SNDHWM, 1_000_000)
    xpub.setsockopt(zmq.LINGER, 0)
    outlet = None
    if a.lsl:
        import pylsl

        info = pylsl.StreamInfo(a.lsl, "Counts", a.channels, a.rate, pylsl.cf_float32, a.lsl + "-probe")
        outlet = pylsl.StreamOutlet(info, chunk_size=1)
    else:
        xpub.bind(a.in_endpoint)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    mon = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(a.out_endpoint)
    missing = wait_ready(xpub, mon, a.connect_timeout, outlet)
    sub.disable_monitor()
    mon.close(0)
    if missing:
        print(f"latency_probe: {missing} (within {a.connect_timeout} s)", file=sys.stderr)
        return 1
    time.sleep(0.2)  # lets our subscription reach latentloop's PUB

    n = int(round(a.seconds * a.rate))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    send = lsl_send(outlet) if outlet is not None else zmq_send(xpub, a.dtype)
    sender = Sender(send, n, a.rate, a.channels, a.mean_count, a.seed, a.dtype, int(a.spin_us * 1e3), stop)
    sender.start()
    # Per sent bin, preallocated (an hour at 1 kHz is 3.6 M rows, ~150 MB; lists of tuples
    # would be several times that): answered, flags, dropped_before, recv/publish/client ns.
    outputs = Outputs(n)
    done_at = None
    while True:
        if sub.poll(20):
            msg = sub.recv()
            client = time.monotonic_ns()
            o = wire.decode_output(msg)
            outputs.add(o, client)
            if sender.sent and o["seq"] == sender.sent - 1 and not sender.is_alive():
                break
        if not sender.is_alive():
            done_at = done_at or time.monotonic()
            if time.monotonic() - done_at >= a.drain:
                break
    sender.join()
    sent = sender.sent
    report = analyse(a, sender, outputs, sent)
    text = json.dumps(report, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    xpub.close()
    sub.close()
    ctx.term()
    return 0


class Outputs:
    def __init__(self, n):
        self.answered = np.zeros(n, bool)
        self.flags = np.zeros(n, np.uint16)
        self.dropped = np.zeros(n, np.int64)
        self.recv_ns = np.zeros(n, np.int64)
        self.publish_ns = np.zeros(n, np.int64)
        self.client_ns = np.zeros(n, np.int64)
        self.foreign = 0  # outputs of an earlier stream (seq beyond what was sent)
        self.repeated = 0

    def add(self, o, client):
        k = o["seq"]
        if k >= len(self.answered):
            self.foreign += 1
            return
        if self.answered[k]:
            self.repeated += 1
        self.answered[k] = True
        self.flags[k] = o["flags"]
        self.dropped[k] = o["dropped_before"]
        self.recv_ns[k] = o["recv_ns"]
        self.publish_ns[k] = o["publish_ns"]
        self.client_ns[k] = client


def analyse(a, sender, outputs, sent):
    period_ns = int(round(1e9 / a.rate))
    deadline_ns = int(a.deadline_us * 1e3) if a.deadline_us is not None else period_ns
    warm = int(round(a.warmup * a.rate))
    o = outputs
    ans = np.nonzero(o.answered[:sent])[0]
    flags_seen = {}
    names, counts = np.unique(o.flags[ans], return_counts=True)
    for f, c in zip(names, counts):
        flags_seen[wire.flag_names(int(f))] = int(c)
    reported_dropped = int(o.dropped[ans].sum())
    send = sender.send_ns[ans]
    clock_violations = int(np.sum(~((send <= o.recv_ns[ans]) & (o.recv_ns[ans] <= o.publish_ns[ans])
                                    & (o.publish_ns[ans] <= o.client_ns[ans]))))
    w = ans[ans >= warm]
    e2e = o.client_ns[w] - sender.send_ns[w]
    into = o.recv_ns[w] - sender.send_ns[w]
    inside = o.publish_ns[w] - o.recv_ns[w]
    out = o.client_ns[w] - o.publish_ns[w]
    answered = ans
    windows = []
    if a.window:
        per = int(round(a.window * a.rate))
        for start in range(0, sent, per):
            sel = w[(w >= start) & (w < start + per)]
            if len(sel):
                windows.append({"from_s": start / a.rate, "to_s": min(start + per, sent) / a.rate,
                                "end_to_end": percentiles(o.client_ns[sel] - sender.send_ns[sel]),
                                "latentloop": percentiles(o.publish_ns[sel] - o.recv_ns[sel])})
    lost = sent - len(answered)
    late_sends = int(np.sum(sender.send_ns[:sent] - sender.deadline_ns[:sent] > period_ns))
    return {
        "rate_hz": a.rate,
        "channels": a.channels,
        "sent": sent,
        "received": len(answered),
        "warmup_bins": min(warm, sent),
        "lost": lost,
        "lost_reported_by_latentloop": min(reported_dropped, lost),
        "lost_unexplained": max(lost - reported_dropped, 0),
        "flags": flags_seen,
        "deadline_us": deadline_ns / 1e3,
        "deadline_misses": int(np.sum(np.asarray(e2e, np.int64) > deadline_ns)),
        "late_sends": late_sends,
        "clock_violations": clock_violations,
        "repeated": o.repeated,
        "windows": windows,
        "latency": {
            "end_to_end": percentiles(e2e),
            "zmq_in": percentiles(into),
            "latentloop": percentiles(inside),
            "zmq_out": percentiles(out),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
