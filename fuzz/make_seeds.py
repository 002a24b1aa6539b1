#!/usr/bin/env python3
"""Writes the seeds of the fuzz targets (fuzz/seeds/<target>/): a few valid inputs
each, made from the shipped configs and models, the Python wire codec and a small real
session. Run from the repository root with the dev venv (numpy):
    .venv/bin/python fuzz/make_seeds.py /tmp/fz   # a folder with m.safetensors and reports/session
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, "python")
from latentloop import wire  # noqa: E402

src = sys.argv[1]
root = "fuzz/seeds"


def put(target, name, data):
    os.makedirs(f"{root}/{target}", exist_ok=True)
    with open(f"{root}/{target}/{name}", "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# LLBN bins: u16, u32, f32, with behaviour, a restart.
put("bin_message", "u16", wire.encode_bin(7, np.arange(8), source_ts=70))
put("bin_message", "f32-behavior", wire.encode_bin(1, np.ones(4) * 2.5, behavior=[0.5, -1.0], dtype="f32"))
put("bin_message", "u32-start", wire.encode_bin(0, [1, 2, 3], flags=wire.FLAG_STREAM_START, dtype="u32"))
put("output_message", "out", wire.encode_output(5, [0.1, 0.2], [1.0, 2.0, 3.0], [0.9, 1.9, 2.9], flags=8, dropped_before=2))


# Open Ephys: mode byte, then length-prefixed frames (see latentloop::fuzzing::openephys_message).
def frames(*parts):
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


def data_msg(num, ch, sample_num, samples, rate=1000.0):
    h = {"message_num": num, "type": "data", "content": {"stream": "s", "channel_num": ch, "channel_name": f"CH{ch + 1}",
         "num_samples": len(samples), "sample_num": sample_num, "sample_rate": rate}, "data_size": 4 * len(samples),
         "timestamp": 0}
    return frames(b"DATA\0", json.dumps(h).encode(), np.asarray(samples, "<f4").tobytes())


def spike_msg(num, electrode, sample_num):
    h = {"message_num": num, "type": "spike", "spike": {"stream": "s", "electrode": electrode, "sample_num": sample_num,
         "num_channels": 1, "num_samples": 4, "sorted_id": 0, "threshold": [-50.0]}, "timestamp": 0}
    return frames(b"EVENT\0", json.dumps(h).encode(), np.zeros(4, "<f4").tobytes())


noise = [0.5, -0.5] * 20
put("openephys_message", "continuous", b"\0" + b"".join(data_msg(i * 4 + c, c, i * 40, noise + ([-10.0] if c == 1 else []))
                                                        for i in range(3) for c in range(4)))
put("openephys_message", "spikes", b"\1" + b"".join(spike_msg(i, f"Electrode {i % 4 + 1}", 10 * i) for i in range(8)))

# Rig configs: every shipped one.
for name in sorted(os.listdir("rig-configs")):
    if name.endswith(".toml"):
        put("rig_config", name, open(f"rig-configs/{name}").read())

# Model files: a small XFADS model, a Kalman model, an imported reference-XFADS model.
put("model_file", "xfads-small", open(f"{src}/m.safetensors", "rb").read())
put("model_file", "kalman", open(f"{src}/kalman.safetensors", "rb").read())
put("model_file", "xfads-names", open(f"{src}/imported.safetensors", "rb").read())

# npz: a small simulated session, uncompressed and compressed.
z = np.load(f"{src}/small.npz")
put("npz", "small", open(f"{src}/small.npz", "rb").read())
np.savez_compressed(f"{src}/small-z.npz", **{k: z[k] for k in z.files})
put("npz", "compressed", open(f"{src}/small-z.npz", "rb").read())

# Session records of a real 25-bin run (its header is fuzz/session.json).
put("session_records", "run", open(f"{src}/reports/session/records.lls", "rb").read())

# Control requests: one of each command.
for i, r in enumerate([{"cmd": "status"}, {"cmd": "pause"}, {"cmd": "load_model", "path": "m.safetensors", "carry_state": False},
                       {"cmd": "mask", "channels": [3, 1]}, {"cmd": "event", "label": "trial", "payload": {"target": [1, 2]}},
                       {"cmd": "calibrate", "seconds": 20, "ridge": 0.01},
                       {"cmd": "adapt", "mode": "rml", "batch_seconds": 1, "half_life_seconds": 60}, {"cmd": "stop"}]):
    put("control_request", f"{i}-{r['cmd']}", json.dumps(r))
