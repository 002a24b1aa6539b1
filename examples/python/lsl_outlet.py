#!/usr/bin/env python3
"""An LSL outlet to try latentloop's `[source] kind = "lsl"` without a rig.

Plays a session file (.npz with `spikes`, T x N, and `dt`, e.g. from `latentloop simulate`)
in real time as an LSL stream, in one of the two shapes latentloop reads:

  counts       one sample per bin (rate 1 / dt), N float32 channels: the counts
  continuous   voltage at --rate Hz (default 30 kHz) in chunks of --chunk samples: noise
               with a negative spike of --spike-uv for every count, at a random sample
               of its bin (latentloop's threshold crossings then recover the counts)

and, with --markers NAME, a string stream beside it with a "trial start" marker every
--marker-every seconds. Waits for a consumer before sending, and paces by absolute
deadlines. Example (rig-configs/lsl-counts.toml reads this):

    latentloop simulate --system lorenz --neurons 50 --bins 60000 --dt 0.001 --out play.npz
    python examples/python/lsl_outlet.py play.npz --name latentloop-sim --markers latentloop-markers

On one machine only: set LSLAPICFG to a config with `ResolveScope = machine` (see
docs/LSL.md) so that nothing is announced beyond it. Needs numpy and pylsl.
"""

import argparse
import sys
import time

import numpy as np


def voltage(spikes, spb, per_push, a, rng):
    """(first bin, chunk of voltage) for each push, made as they are needed."""
    n = spikes.shape[1]
    slots = max(1, spb // 30)  # spike positions 30 samples apart (beyond a 1 ms refractory at 30 kHz)
    for k in range(0, len(spikes), per_push):
        block = spikes[k:k + per_push]
        v = rng.normal(0.0, a.noise_uv, (len(block) * spb, n)).astype(np.float32)
        for b, row in enumerate(block):
            for c in np.nonzero(row)[0]:
                at = rng.choice(slots, size=min(int(row[c]), slots), replace=False)
                v[b * spb + at * 30, c] += a.spike_uv
        yield k, v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("session", help=".npz with spikes (T x N) and dt")
    p.add_argument("--name", default="latentloop-sim", help="the stream's name (what [source.lsl] name resolves)")
    p.add_argument("--shape", choices=["counts", "continuous"], default="counts")
    p.add_argument("--rate", type=float, default=30000.0, help="continuous: samples per second")
    p.add_argument("--chunk", type=int, default=300, help="continuous: samples per push")
    p.add_argument("--noise-uv", type=float, default=10.0, help="continuous: noise sd")
    p.add_argument("--spike-uv", type=float, default=-120.0, help="continuous: spike amplitude")
    p.add_argument("--markers", metavar="NAME", help="also a marker stream of this name")
    p.add_argument("--marker-every", type=float, default=2.0, help="seconds between markers")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a consumer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        import pylsl
    except ImportError:
        p.error("pylsl is not installed: pip install pylsl")
    with np.load(a.session) as z:
        if "spikes" not in z or "dt" not in z:
            p.error(f"{a.session}: needs 'spikes' and 'dt' arrays")
        spikes = np.asarray(z["spikes"], np.float32)
        dt = float(z["dt"])
    t_bins, n = spikes.shape
    bin_rate = 1.0 / dt
    if a.shape == "counts":
        rate, fmt = bin_rate, "Counts"
    else:
        rate, fmt = a.rate, "EEG"
        spb = int(round(a.rate * dt))
        if abs(spb - a.rate * dt) > 1e-6 or spb < 2:
            p.error(f"--rate {a.rate} is not a whole number (>= 2) of samples per {dt} s bin")
    info = pylsl.StreamInfo(a.name, fmt, n, rate, pylsl.cf_float32, a.name + "-example")
    outlet = pylsl.StreamOutlet(info, chunk_size=1 if a.shape == "counts" else a.chunk)
    mout = None
    if a.markers:
        mout = pylsl.StreamOutlet(pylsl.StreamInfo(a.markers, "Markers", 1, 0, pylsl.cf_string, a.markers + "-example"))
    print(f"{a.name}: {t_bins} bins x {n} channels as {a.shape} at {rate:g} Hz; waiting for a consumer", file=sys.stderr)
    if not outlet.wait_for_consumers(a.wait) or (mout is not None and not mout.wait_for_consumers(a.wait)):
        sys.exit(f"no consumer within {a.wait} s")
    rng = np.random.default_rng(a.seed)
    t0 = time.monotonic() + 0.1
    next_marker, trial = 0.0, 0
    if a.shape == "counts":
        steps = ((k, spikes[k:k + 1]) for k in range(t_bins))
        step_s = dt
    else:
        per_push = max(1, a.chunk // spb)  # whole bins per push
        steps = voltage(spikes, spb, per_push, a, rng)
        step_s = per_push * dt
    try:
        for i, (k, data) in enumerate(steps):
            due = t0 + (i + 1) * step_s  # a chunk is sent when its last sample is due
            while (left := due - time.monotonic()) > 0:
                time.sleep(min(left, 0.001))
            if mout is not None and k * dt >= next_marker:
                trial += 1
                mout.push_sample([f"trial {trial} start"])
                next_marker += a.marker_every
            if len(data) == 1:
                outlet.push_sample(data[0])
            else:
                outlet.push_chunk(data)
    except KeyboardInterrupt:
        pass
    time.sleep(0.5)  # what was pushed is sent before the outlet goes
    print(f"{a.name}: done", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
