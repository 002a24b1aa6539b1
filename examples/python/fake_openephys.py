#!/usr/bin/env python3
"""A fake Open Ephys GUI: publishes what the ZMQ Interface plugin (v1.0.0) publishes.

Use it to try latentloop's `openephys` source without a rig, or in tests. It binds the
data socket like the plugin (tcp://*:5556 by default) and sends, per processing block:

  - spike events for the injected spikes detected in this block (optional), then
  - one continuous-data message per channel:
      frame 1  b"DATA\\0"
      frame 2  JSON {"message_num", "type": "data",
                     "content": {"stream", "channel_num", "channel_name", "num_samples",
                                 "sample_num", "sample_rate"},
                     "data_size": num_samples * 4, "timestamp": wall-clock ms}
      frame 3  num_samples float32, little-endian
  - and, every --ttl-every seconds, a TTL event (b"EVENT\\0", JSON type "event", 10 bytes).

Spike events are b"EVENT\\0" with JSON {"message_num", "type": "spike", "spike": {"stream",
"source_node", "electrode", "sample_num", "num_channels", "num_samples", "sorted_id",
"threshold": [...]}, "timestamp"} and the waveform (num_channels x num_samples float32).

message_num counts every message and starts at 1 (the plugin resets it when acquisition
starts). --drop N,M skips sending those message numbers (as a PUB at its high-water mark
would), so a receiver sees the gap.

The signal: uniform noise in [-1, 1] (robust sd 0.5 / 0.6745 = 0.74), plus spikes with a
trough of --spike-amplitude at known sample numbers: a crossing detector with a threshold
of a few sd counts each spike exactly once, at its trough sample. Spikes start after
--spikes-after seconds (leave the receiver's noise warm-up clean) and are at least
--min-isi-ms apart on a channel. --truth writes them as JSON:
  {"sample_rate", "first_sample", "samples", "channels", "block",
   "spikes": [[channel, sample_num], ...], "sent": messages sent, "dropped": [...],
   "last_message_num"}

The socket is an XPUB (to subscribers the same as the plugin's PUB), so with
--wait-subscribers N the fake waits until N subscriptions arrived before the first block:
nothing is lost to the ZeroMQ slow-joiner effect.

Example:
  python fake_openephys.py --endpoint tcp://127.0.0.1:5556 --channels 32 \\
      --sample-rate 30000 --block 300 --duration 60 --spike-rate 20 --spike-events
"""

import argparse
import json
import sys
import time

import numpy as np
import zmq

WAVEFORM = np.array([1.0, 0.6, 0.3, 0.1], dtype=np.float32)  # times -amplitude, trough first
SPIKE_EVENT_SAMPLES = 40


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default="tcp://*:5556", help="where to bind the data socket")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--sample-rate", type=float, default=30000.0)
    p.add_argument("--block", type=int, default=1024, help="samples per processing block (the GUI's buffer size)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of data")
    p.add_argument("--first-sample", type=int, default=0, help="sample_num of the first block")
    p.add_argument("--stream", default="example_data")
    p.add_argument("--speed", type=float, default=1.0, help="1 = real time, 2 = twice as fast, 0 = no pacing")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--spike-rate", type=float, default=10.0, help="injected spikes per second per channel")
    p.add_argument("--spike-amplitude", type=float, default=12.0)
    p.add_argument("--spikes-after", type=float, default=0.0, help="no spikes in the first seconds")
    p.add_argument("--min-isi-ms", type=float, default=3.0)
    p.add_argument("--spike-events", action="store_true", help="also send spike events")
    p.add_argument("--spike-delay", type=int, default=0,
                   help="a spike event goes out with the block holding sample_num + this many samples")
    p.add_argument("--electrode-format", default="Electrode {}", help="electrode name; {} = channel + 1")
    p.add_argument("--ttl-every", type=float, default=0.0, help="a TTL event every this many seconds (0: none)")
    p.add_argument("--drop", default="", help="message numbers not to send, comma-separated")
    p.add_argument("--wait-subscribers", type=int, default=0, help="wait for this many subscriptions first")
    p.add_argument("--wait", type=float, default=1.0,
                   help="without --wait-subscribers: seconds to wait after binding; with it: the most to wait")
    p.add_argument("--sndhwm", type=int, default=100000)
    p.add_argument("--truth", default=None, help="write the injected spikes and message counts here (JSON)")
    return p.parse_args(argv)


def make_spikes(rng, channels, n_samples, rate, after, min_isi):
    """Per channel, sorted spike samples (offsets from the first sample)."""
    spikes = []
    end = n_samples - len(WAVEFORM)
    for _ in range(channels):
        times, t = [], after
        while rate > 0:
            t += max(min_isi, int(rng.exponential(1.0 / rate)))
            if t >= end:
                break
            times.append(t)
        spikes.append(times)
    return spikes


class Publisher:
    def __init__(self, sock, drop, stream):
        self.sock = sock
        self.drop = drop
        self.stream = stream
        self.num = 0
        self.sent = 0

    def send(self, envelope, header, payload=None):
        self.num += 1
        header["message_num"] = self.num
        header["timestamp"] = int(time.time() * 1000)
        if self.num in self.drop:
            return
        frames = [envelope, json.dumps(header, indent=2).encode()]
        if payload is not None:
            frames.append(payload)
        self.sock.send_multipart(frames)
        self.sent += 1

    def data(self, channel, sample_num, sample_rate, x):
        x = np.ascontiguousarray(x, dtype="<f4")
        self.send(b"DATA\0", {
            "message_num": 0,
            "type": "data",
            "content": {
                "stream": self.stream,
                "channel_num": channel,
                "channel_name": f"CH{channel + 1}",
                "num_samples": len(x),
                "sample_num": int(sample_num),
                "sample_rate": float(sample_rate),
            },
            "data_size": len(x) * 4,
            "timestamp": 0,
        }, x.tobytes())

    def spike(self, electrode, sample_num, amplitude):
        wave = np.zeros(SPIKE_EVENT_SAMPLES, dtype="<f4")
        wave[8:8 + len(WAVEFORM)] = -amplitude * WAVEFORM
        self.send(b"EVENT\0", {
            "message_num": 0,
            "type": "spike",
            "spike": {
                "stream": self.stream,
                "source_node": 104,
                "electrode": electrode,
                "sample_num": int(sample_num),
                "num_channels": 1,
                "num_samples": SPIKE_EVENT_SAMPLES,
                "sorted_id": 0,
                "threshold": [-50.0],
            },
            "timestamp": 0,
        }, wave.tobytes())

    def ttl(self, sample_num, line, on):
        data = bytes([line, 1 if on else 0]) + ((1 << line) if on else 0).to_bytes(8, "little")
        self.send(b"EVENT\0", {
            "message_num": 0,
            "type": "event",
            "content": {"stream": self.stream, "source_node": 100, "type": 3, "sample_num": int(sample_num)},
            "data_size": len(data),
            "timestamp": 0,
        }, data)


def wait_for_subscribers(sock, n, timeout):
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < n:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"fake_openephys: only {seen} of {n} subscribers after {timeout} s; sending anyway",
                  file=sys.stderr)
            return
        if sock.poll(int(left * 1000) + 1):
            msg = sock.recv()
            if msg[:1] == b"\x01":
                seen += 1


def main(argv=None):
    a = parse_args(argv)
    rng = np.random.default_rng(a.seed)
    sr, block = a.sample_rate, a.block
    n_samples = int(round(a.duration * sr))
    spikes = make_spikes(rng, a.channels, n_samples, a.spike_rate / sr, int(a.spikes_after * sr),
                         max(int(round(a.min_isi_ms / 1000 * sr)), len(WAVEFORM)))
    drop = {int(x) for x in a.drop.split(",") if x.strip()}

    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, a.sndhwm)
    sock.setsockopt(zmq.XPUB_VERBOSE, 1)
    sock.bind(a.endpoint)
    if a.wait_subscribers > 0:
        wait_for_subscribers(sock, a.wait_subscribers, a.wait)
    else:
        time.sleep(a.wait)

    pub = Publisher(sock, drop, a.stream)
    ttl_every = int(round(a.ttl_every * sr)) if a.ttl_every > 0 else 0
    next_ttl, ttl_on = ttl_every, True
    # Spike events, in the order they go out: (offset + delay, channel, offset).
    events = sorted((t + a.spike_delay, c, t) for c, ts in enumerate(spikes) for t in ts)
    ev = 0
    t0 = time.monotonic()
    for k, start in enumerate(range(0, n_samples, block)):
        end = min(start + block, n_samples)
        if a.speed > 0:
            due = t0 + end / sr / a.speed
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        while ev < len(events) and events[ev][0] < end:
            _, c, t = events[ev]
            pub.spike(a.electrode_format.format(c + 1), a.first_sample + t, a.spike_amplitude)
            ev += 1
        while ttl_every and next_ttl < end:
            pub.ttl(a.first_sample + next_ttl, 1, ttl_on)
            ttl_on = not ttl_on
            next_ttl += ttl_every
        for c in range(a.channels):
            x = rng.uniform(-1.0, 1.0, end - start).astype(np.float32)
            for t in spikes[c]:
                lo, hi = max(t, start), min(t + len(WAVEFORM), end)
                if lo < hi:
                    x[lo - start:hi - start] = -a.spike_amplitude * WAVEFORM[lo - t:hi - t]
            pub.data(c, a.first_sample + start, sr, x)

    if a.truth:
        with open(a.truth, "w") as f:
            json.dump({
                "sample_rate": sr,
                "first_sample": a.first_sample,
                "samples": n_samples,
                "channels": a.channels,
                "block": block,
                "spikes": [[c, a.first_sample + t] for c, ts in enumerate(spikes) for t in ts],
                "sent": pub.sent,
                "dropped": sorted(d for d in drop if d <= pub.num),
                "last_message_num": pub.num,
            }, f)
    time.sleep(0.2)  # let the last messages leave
    sock.close(linger=1000)
    ctx.term()


if __name__ == "__main__":
    main()
