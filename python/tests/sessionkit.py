"""Hand-built session folders, written the way docs/SESSION.md says (independently of the
reader under test), for what a real run does not easily produce: ties and disorder in
receive times, an aborted end, unknown chunk kinds, raw payloads, no bins at all."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from latentloop.session import record_dtype


def header(**over):
    h = {
        "format": "latentloop-session", "version": 1, "latentloop_version": "test", "git_commit": "unknown",
        "created": "2026-01-02T03:04:05Z", "created_monotonic_ns": 10_000_000_000,
        "clock": "test", "config_path": "x.toml", "config_text": "[source]\nkind = \"zmq\"\n",
        "source": "zmq", "bin_ms": 1.0, "channels": 3, "behavior_dims": 1, "model": None,
        "decoder": {"seed": 1, "samples": None, "kalman_mode": "exact", "backend": "cpu", "max_predict_gap": 50},
        "description": "hand-built", "subject": {"subject_id": "s/1", "species": "Homo sapiens", "sex": "O",
                                                 "age": "P30Y"},
        "metadata": {},
    }
    h.update(over)
    return h


def frame(kind, payload, encoding=1):
    """One chunk: the 24-byte frame, then the payload (zlib-compressed for encoding 1)."""
    stored = zlib.compress(payload) if encoding == 1 else payload
    head = struct.pack("<4sBBHIII", b"LLSC", kind, encoding, 0, len(stored), len(payload), zlib.crc32(stored))
    return head + struct.pack("<I", zlib.crc32(head)) + stored


def bins_payload(records, channels=3, dims=1, latents=2):
    """records: dicts of field values (missing ones 0); arrays as lists."""
    dt = record_dtype(channels, dims, latents)
    a = np.zeros(len(records), dt)
    for i, r in enumerate(records):
        for k, v in r.items():
            a[k][i] = v
    return struct.pack("<IHH", channels, dims, latents) + a.tobytes()


def events_payload(events):
    return "".join(json.dumps(e) + "\n" for e in events).encode()


def write(dir_, chunks, hdr=None, version=1):
    """A session folder: header, then records.lls of `chunks` (bytes from frame())."""
    d = Path(dir_)
    d.mkdir(parents=True, exist_ok=True)
    (d / "session.json").write_text(json.dumps(hdr or header(), indent=2))
    (d / "records.lls").write_bytes(b"LLSESSN\0" + struct.pack("<I", version) + b"\0" * 4 + b"".join(chunks))
    return d


def chunk_starts(b):
    """Byte offsets of every chunk of a records.lls (trusting the lengths)."""
    at, out = 16, []
    while at + 24 <= len(b):
        out.append(at)
        at += 24 + struct.unpack_from("<I", b, at + 8)[0]
    return out
