"""latentloop's two wire schemas in Python: one binned observation in, one decoded bin out.

This module mirrors src/wire/bin.rs and src/wire/output.rs exactly (docs/WIRE.md has the
tables). Every message is one ZeroMQ frame, little-endian, with a fixed-size header, so
`struct` is all it takes. Only the standard library and numpy are used.

    import zmq
    from latentloop import wire as w
    pub = zmq.Context().socket(zmq.PUB); pub.bind("tcp://127.0.0.1:5555")
    pub.send(w.encode_bin(0, counts, flags=w.FLAG_STREAM_START))
    ...
    sub.connect("tcp://127.0.0.1:5560"); sub.setsockopt(zmq.SUBSCRIBE, b"")
    out = w.decode_output(sub.recv())      # dict: seq, flags, behavior, latent, lag1, ...

Clock: `recv_ns` and `publish_ns` in the output are the host's CLOCK_MONOTONIC in ns, the
clock `time.monotonic_ns()` reads on Linux, so a client on the same host can subtract them
from its own stamps.

Run `python -m latentloop.wire` to self-test the encoders against the decoders.
(This module was examples/python/latentloop_wire.py; the names are unchanged.)
"""

import struct

import numpy as np

__all__ = [
    "BIN_MAGIC", "BIN_VERSION", "BIN_HEADER", "OUT_MAGIC", "OUT_VERSION", "OUT_HEADER",
    "DTYPES", "FLAG_NO_DATA", "FLAG_STREAM_START", "FLAG_PREDICT_ONLY", "FLAG_RESET",
    "FLAG_REJECTED", "FLAG_GAP", "FLAG_RESTART", "FLAG_PAUSED", "encode_bin", "decode_bin", "output_len",
    "decode_output", "encode_output", "flag_names", "WireError",
]

# --- Input: one bin per message (src/wire/bin.rs) -------------------------------------
#
# | offset | size | field |
# | 0  | 4 | magic `LLBN` |
# | 4  | 2 | schema version (1) |
# | 6  | 2 | dtype of the counts: 0 = u16, 1 = u32, 2 = f32 |
# | 8  | 4 | channel count N |
# | 12 | 2 | flags: bit 0 no data (a missing bin), bit 1 stream start (publisher (re)started) |
# | 14 | 2 | behaviour count D (0, or the decoder's D: calibration targets / ground truth) |
# | 16 | 8 | sequence number (u64, +1 per bin) |
# | 24 | 8 | source timestamp (u64: sample number or ns; echoed, never interpreted) |
# | 32 | N x size | counts |
# | .. | D x 4 | behaviour, f32 |

BIN_MAGIC = b"LLBN"
BIN_VERSION = 1
BIN_HEADER = 32
_BIN_HEAD = struct.Struct("<4sHHIHHQQ")
assert _BIN_HEAD.size == BIN_HEADER

#: dtype name -> (wire code, numpy little-endian dtype)
DTYPES = {"u16": (0, "<u2"), "u32": (1, "<u4"), "f32": (2, "<f4")}
_DTYPE_BY_CODE = {code: (name, npdt) for name, (code, npdt) in DTYPES.items()}

#: The bin carries no data: latentloop decodes it as a predict-only step.
FLAG_NO_DATA = 1
#: First bin of a (re)started publisher: the decoder starts over from its prior.
FLAG_STREAM_START = 2

# --- Output: one decoded bin per message (src/wire/output.rs) --------------------------
#
# | offset | size | field |
# | 0  | 4 | magic `LLOT` |
# | 4  | 2 | schema version (1) |
# | 6  | 2 | flags (below) |
# | 8  | 4 | bins dropped or missing since the previous output (u32) |
# | 12 | 2 | behaviour dims D |
# | 14 | 2 | latent dims L |
# | 16 | 8 | sequence number, echoed from the input bin |
# | 24 | 8 | source timestamp, echoed |
# | 32 | 8 | host CLOCK_MONOTONIC ns when the bin was received (complete) |
# | 40 | 8 | host CLOCK_MONOTONIC ns just before this message was sent |
# | 48 | 4 | KL(q_t || prediction) in nats, f32 (0 for a predict-only step) |
# | 52 | 4 | reserved (0) |
# | 56 | D x 4 | decoded behaviour, f32 |
# | .. | L x 4 | filtered latent mean m_t, f32 |
# | .. | L x 4 | lag-1 smoothed mean m_{t-1|t}, f32 |

OUT_MAGIC = b"LLOT"
OUT_VERSION = 1
OUT_HEADER = 56
_OUT_HEAD = struct.Struct("<4sHHIHHQQQQfI")
assert _OUT_HEAD.size == OUT_HEADER

#: No observation entered this step (the bin had no data, or was refused).
FLAG_PREDICT_ONLY = 1
#: The decoder started over from its prior at this bin.
FLAG_RESET = 2
#: The input bin was refused (malformed payload, wrong channel count, NaN, absurd value).
FLAG_REJECTED = 4
#: Bins were missing or skipped before this one (`dropped_before` says how many); the
#: decoder predicted through them, unless FLAG_RESET is set too.
FLAG_GAP = 8
#: The publisher restarted (stream-start flag or sequence reset).
FLAG_RESTART = 16
#: Decoding is paused (control `pause`): the task should not act on this output.
FLAG_PAUSED = 32

_OUT_FLAG_NAMES = [
    (FLAG_PREDICT_ONLY, "PREDICT_ONLY"),
    (FLAG_RESET, "RESET"),
    (FLAG_REJECTED, "REJECTED"),
    (FLAG_GAP, "GAP"),
    (FLAG_RESTART, "RESTART"),
    (FLAG_PAUSED, "PAUSED"),
]


class WireError(ValueError):
    """A message that is not a valid latentloop message."""


def encode_bin(seq, counts, source_ts=0, flags=0, behavior=None, dtype="u16"):
    """One input bin as bytes.

    seq: sequence number (u64, +1 per bin; start at 0 with FLAG_STREAM_START).
    counts: N values (spike counts; any sequence or numpy array). With dtype "u16" or
        "u32" they must be integers in range (checked); "f32" carries them as float32.
    source_ts: echoed in the output, never interpreted (sample number or ns).
    flags: FLAG_NO_DATA | FLAG_STREAM_START.
    behavior: None, or D float32 values (calibration targets / ground truth).
    dtype: "u16", "u32" or "f32".
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    code, npdt = DTYPES[dtype]
    c = np.asarray(counts)
    if c.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, got shape {c.shape}")
    if dtype != "f32":
        info = np.iinfo(npdt)
        if c.size and (not np.all(np.isfinite(c)) or c.min() < info.min or c.max() > info.max
                       or np.any(c != np.round(c))):
            raise ValueError(f"counts do not fit {dtype} (integers in {info.min}..={info.max})")
    payload = c.astype(npdt).tobytes()
    b = np.zeros(0, "<f4") if behavior is None else np.asarray(behavior, "<f4").reshape(-1)
    head = _BIN_HEAD.pack(BIN_MAGIC, BIN_VERSION, code, c.size, flags, b.size, seq, source_ts)
    return head + payload + b.tobytes()


def decode_bin(msg):
    """Parses an input bin (for tools and tests) -> dict(seq, source_ts, flags, dtype,
    counts (numpy, as sent), behavior (float32 numpy, maybe empty))."""
    msg = bytes(msg)
    if len(msg) < BIN_HEADER:
        raise WireError(f"message of {len(msg)} bytes is shorter than the {BIN_HEADER}-byte header")
    magic, version, code, n, flags, d, seq, ts = _BIN_HEAD.unpack_from(msg)
    if magic != BIN_MAGIC:
        raise WireError(f"bad magic {magic!r} (not a latentloop bin)")
    if version != BIN_VERSION:
        raise WireError(f"schema version {version} is not supported (this module speaks 1)")
    if code not in _DTYPE_BY_CODE:
        raise WireError(f"unknown dtype code {code} (0 = u16, 1 = u32, 2 = f32)")
    name, npdt = _DTYPE_BY_CODE[code]
    size = np.dtype(npdt).itemsize
    expected = BIN_HEADER + n * size + d * 4
    if len(msg) != expected:
        raise WireError(f"payload is {len(msg)} bytes, header implies {expected}")
    counts = np.frombuffer(msg, npdt, n, BIN_HEADER)
    behavior = np.frombuffer(msg, "<f4", d, BIN_HEADER + n * size)
    return dict(seq=seq, source_ts=ts, flags=flags, dtype=name, counts=counts, behavior=behavior)


def output_len(d, l):
    """Length of an output message for D behaviour and L latent dimensions."""
    return OUT_HEADER + 4 * (d + 2 * l)


def decode_output(msg):
    """Parses one output message -> dict with keys flags, dropped_before, seq, source_ts,
    recv_ns, publish_ns, kl, behavior (D), latent (L), lag1 (L); the arrays are float32."""
    msg = bytes(msg)
    if len(msg) < OUT_HEADER:
        raise WireError(f"message of {len(msg)} bytes is shorter than the {OUT_HEADER}-byte header")
    (magic, version, flags, dropped, d, l, seq, ts, recv_ns, publish_ns, kl,
     _reserved) = _OUT_HEAD.unpack_from(msg)
    if magic != OUT_MAGIC:
        raise WireError(f"bad magic {magic!r} (not a latentloop output)")
    if version != OUT_VERSION:
        raise WireError(f"schema version {version} is not supported (this module speaks 1)")
    if len(msg) != output_len(d, l):
        raise WireError(f"payload is {len(msg)} bytes, header implies {output_len(d, l)}")
    vals = np.frombuffer(msg, "<f4", d + 2 * l, OUT_HEADER)
    return dict(
        flags=flags,
        dropped_before=dropped,
        seq=seq,
        source_ts=ts,
        recv_ns=recv_ns,
        publish_ns=publish_ns,
        kl=kl,
        behavior=vals[:d].copy(),
        latent=vals[d:d + l].copy(),
        lag1=vals[d + l:].copy(),
    )


def encode_output(seq, behavior, latent, lag1, flags=0, dropped_before=0, source_ts=0,
                  recv_ns=0, publish_ns=0, kl=0.0):
    """An output message as latentloop writes it (for tests and fake decoders)."""
    b, m, g = (np.asarray(x, "<f4").reshape(-1) for x in (behavior, latent, lag1))
    if m.size != g.size:
        raise ValueError("latent and lag1 must have the same length")
    head = _OUT_HEAD.pack(OUT_MAGIC, OUT_VERSION, flags, dropped_before, b.size, m.size, seq,
                          source_ts, recv_ns, publish_ns, kl, 0)
    return head + b.tobytes() + m.tobytes() + g.tobytes()


def flag_names(flags):
    """Output flags as text, e.g. 'GAP|PREDICT_ONLY' ('-' when clear)."""
    names = [n for bit, n in _OUT_FLAG_NAMES if flags & bit]
    unknown = flags & ~sum(bit for bit, _ in _OUT_FLAG_NAMES)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names) or "-"


def _self_test():
    for dt in DTYPES:
        m = encode_bin(41, [0, 3, 65535], source_ts=7, flags=FLAG_STREAM_START,
                       behavior=[0.5, -1.0], dtype=dt)
        assert len(m) == BIN_HEADER + 3 * np.dtype(DTYPES[dt][1]).itemsize + 8
        b = decode_bin(m)
        assert (b["seq"], b["source_ts"], b["flags"], b["dtype"]) == (41, 7, FLAG_STREAM_START, dt)
        assert list(b["counts"]) == [0, 3, 65535] and list(b["behavior"]) == [0.5, -1.0]
    o = encode_output(9, [1, 2], [3, 4, 5], [6, 7, 8], flags=FLAG_GAP, dropped_before=3,
                      source_ts=90, recv_ns=5, publish_ns=77, kl=1.5)
    assert len(o) == output_len(2, 3)
    d = decode_output(o)
    assert (d["seq"], d["flags"], d["dropped_before"], d["recv_ns"], d["publish_ns"], d["kl"]) == \
        (9, FLAG_GAP, 3, 5, 77, 1.5)
    assert list(d["latent"]) == [3, 4, 5] and list(d["lag1"]) == [6, 7, 8]
    assert flag_names(FLAG_REJECTED | FLAG_PREDICT_ONLY) == "PREDICT_ONLY|REJECTED"
    for bad in (o[:60], b"XXXX" + o[4:]):
        try:
            decode_output(bad)
        except WireError:
            pass
        else:
            raise AssertionError("accepted a bad message")
    print("latentloop.wire: self-test passed")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description="latentloop's wire schemas (a module to import). Run without arguments "
                    "to self-test the encoders against the decoders.").parse_args()
    _self_test()
