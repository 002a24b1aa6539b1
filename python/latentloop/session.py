"""Reading a latentloop session folder (docs/SESSION.md) with numpy only.

A session folder is what `latentloop run` recorded: `session.json` (the header),
`model-K.safetensors` and `records.lls`, a stream of framed, checksummed chunks (bins,
events, the end). This reader mirrors the Rust one (src/session/read.rs) on purpose, so
both say the same thing about the same file:

- it refuses what it cannot read correctly: a folder without a session header, a header or
  record stream of a newer format version (named, with "upgrade latentloop");
- it reads everything up to the first damaged chunk (a cut-off chunk after `kill -9`, a
  bad frame or payload checksum, a payload that does not decompress) and says where it
  stopped in `damage`, naming the chunk and its byte offset, with the Rust reader's words;
- it skips chunk kinds it does not know (a newer writer may add some).

    from latentloop.session import read_session
    s = read_session("reports/sim-lorenz/session")
    print(s.status())                    # "100 bins; the session ended cleanly"
    counts = s["counts"]                 # (T, N) float32, every record in file order
    ok = s["decision"] == DECODED

Bin records are one numpy structured array per chunk (`bin_chunks`); a chunk holds records
of one shape. `s.bins` concatenates them when every chunk has the same shape (the
decoder's state size changes only with a model swap); `s[name]` works across shapes for
every field (latents of differing sizes are padded with NaN).

The whole file is read into memory (about 340 bytes per 50-channel bin: an hour at 1 kHz
is about 1.2 GB); the Rust reader streams chunk by chunk for longer sessions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import struct
import zlib

import numpy as np

from . import wire as _wire

__all__ = [
    "read_session", "Session", "SessionError", "record_dtype", "parse_rfc3339",
    "FORMAT_NAME", "VERSION", "HEADER_FILE", "RECORDS_FILE",
    "DECODED", "SKIPPED", "STALE", "OUT_OF_ORDER", "RING_FULL", "CALIBRATION", "DECISION_NAMES",
    "KIND_DATA", "KIND_NO_DATA", "KIND_REFUSED", "KIND_NAMES",
    "DTYPE_U16", "DTYPE_U32", "DTYPE_F32", "DTYPE_BINNED", "DTYPE_NAMES",
    "BIT_HAS_BEHAVIOR", "BIT_RESTART", "BIT_OUTPUT_DROPPED", "FIXED_FIELDS", "ARRAY_FIELDS",
]

FORMAT_NAME = "latentloop-session"
#: The format version this reader reads; newer ones are refused by name.
VERSION = 1
HEADER_FILE = "session.json"
RECORDS_FILE = "records.lls"
MAGIC = b"LLSESSN\0"
FILE_HEADER = 16
CHUNK_MAGIC = b"LLSC"
CHUNK_HEADER = 24
CHUNK_BINS, CHUNK_EVENTS, CHUNK_END = 1, 2, 3
ENCODING_RAW, ENCODING_ZLIB = 0, 1
SHAPE_BYTES = 8
BIN_FIXED = 96

# `decision`: what happened to a bin.
DECODED, SKIPPED, STALE, OUT_OF_ORDER, RING_FULL, CALIBRATION = range(6)
DECISION_NAMES = {DECODED: "decoded", SKIPPED: "skipped", STALE: "stale",
                  OUT_OF_ORDER: "out_of_order", RING_FULL: "ring_full", CALIBRATION: "calibration"}
# `kind`: what the bin was.
KIND_DATA, KIND_NO_DATA, KIND_REFUSED = 0, 1, 2
KIND_NAMES = {KIND_DATA: "data", KIND_NO_DATA: "no_data", KIND_REFUSED: "refused"}
# `dtype`: how the counts were received.
DTYPE_U16, DTYPE_U32, DTYPE_F32, DTYPE_BINNED = 0, 1, 2, 3
DTYPE_NAMES = {DTYPE_U16: "u16", DTYPE_U32: "u32", DTYPE_F32: "f32", DTYPE_BINNED: "binned"}
# `bits`.
BIT_HAS_BEHAVIOR = 1
BIT_RESTART = 2
BIT_OUTPUT_DROPPED = 4
# `wire_flags` are the LLBN flags, `out_flags` the LLOT flags (latentloop.wire).
WIRE_FLAG_NO_DATA = _wire.FLAG_NO_DATA
WIRE_FLAG_STREAM_START = _wire.FLAG_STREAM_START

#: The fixed 96 bytes of a bin record, in file order (docs/SESSION.md).
FIXED_FIELDS = [
    ("index", "<u8"), ("seq", "<u8"), ("source_ts", "<u8"), ("recv_ns", "<u8"),
    ("push_ns", "<u8"), ("pop_ns", "<u8"), ("step_ns", "<u8"), ("publish_ns", "<u8"),
    ("skipped", "<u8"), ("dropped_before", "<u4"), ("kl", "<f4"),
    ("wire_flags", "<u2"), ("out_flags", "<u2"), ("decision", "u1"), ("kind", "u1"),
    ("dtype", "u1"), ("bits", "u1"), ("records_lost_before", "<u4"), ("_reserved", "<u4"),
]
#: The arrays after them: name -> which dimension of the chunk's shape sizes it.
ARRAY_FIELDS = {"counts": "channels", "behavior_in": "behavior_dims", "behavior_out": "behavior_dims",
                "latent": "latents", "lag1": "latents"}
_FRAME = struct.Struct("<4sBBHIIII")
_SHAPE = struct.Struct("<IHH")


def record_dtype(channels, behavior_dims, latents):
    """The numpy dtype of one bin record of this shape (96 + 4 (N + 2D + 2L) bytes)."""
    fields = list(FIXED_FIELDS)
    for name, dim in ARRAY_FIELDS.items():
        n = {"channels": channels, "behavior_dims": behavior_dims, "latents": latents}[dim]
        fields.append((name, "<f4", (n,)))
    dt = np.dtype(fields)
    assert dt.itemsize == BIN_FIXED + 4 * (channels + 2 * behavior_dims + 2 * latents)
    return dt


class SessionError(ValueError):
    """A folder this reader refuses: not a session, or a newer format. (Damage after
    readable records is not an error: see Session.damage.)"""


def _bad(path, msg):
    return SessionError(f"{path}: {msg}")


_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)$")


def parse_rfc3339(text):
    """An RFC 3339 time ("2026-12-03T12:45:42Z", fractions and offsets allowed) as an aware
    UTC datetime (fractions beyond microseconds are dropped: datetime cannot hold them)."""
    m = _RFC3339.match(str(text).strip())
    if not m:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    us = int((frac or "0")[:6].ljust(6, "0"))
    if tz in ("Z", "z"):
        off = _dt.timezone.utc
    else:
        sign = 1 if tz[0] == "+" else -1
        off = _dt.timezone(sign * _dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    t = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), us, tzinfo=off)
    return t.astimezone(_dt.timezone.utc)


class Session:
    """An opened session folder (see read_session)."""

    def __init__(self, path, header):
        self.path = os.fspath(path)
        #: session.json, as a dict.
        self.header = header
        #: Every event, in the order written (dicts; lines that are not JSON are skipped).
        self.events = []
        #: The end chunk's JSON (the run's counters), or {"aborted": true}; None without one.
        self.end = None
        #: What stopped the reading before the end of the file (a sentence naming the chunk
        #: and byte), or None.
        self.damage = None
        #: One structured array (record_dtype) per bins chunk, in file order.
        self.bin_chunks = []
        self._bins = None

    # --- status ------------------------------------------------------------------------

    @property
    def n_bins(self):
        """Bin records readable (up to any damage)."""
        return sum(len(c) for c in self.bin_chunks)

    def __len__(self):
        return self.n_bins

    @property
    def aborted(self):
        """The run closed its recording after an error stopped it."""
        return isinstance(self.end, dict) and self.end.get("aborted") is True

    @property
    def clean(self):
        """The run ended cleanly and nothing is damaged."""
        return self.end is not None and not self.aborted and self.damage is None

    def status(self):
        """One sentence for people, worded as the Rust reader words it."""
        n = self.n_bins
        if self.damage is not None:
            return f"recovered {n} bins; the session did not end cleanly: {self.damage}"
        if self.end is None:
            return f"recovered {n} bins; the session did not end cleanly (no end record)"
        if self.aborted:
            return f"{n} bins; the run was stopped by an error (its recording was closed)"
        return f"{n} bins; the session ended cleanly"

    # --- bins --------------------------------------------------------------------------

    @property
    def shapes(self):
        """(channels, behaviour dims, latents) of each bins chunk."""
        return [_shape_of(c.dtype) for c in self.bin_chunks]

    @property
    def bins(self):
        """Every bin record as one structured array, when every chunk has the same shape.
        A session whose decoder changed state size (a model swap) has chunks of different
        shapes: use `bin_chunks`, or `s[name]`, which works across shapes."""
        if self._bins is None:
            shapes = sorted(set(self.shapes))
            if len(shapes) > 1:
                raise SessionError(
                    f"{self.path}: its bins chunks have different shapes (channels, behaviour dims, "
                    f"latents: {', '.join(map(str, shapes))}), so they do not make one array; use "
                    "session.bin_chunks, or session[field] (latents padded with NaN)")
            if not self.bin_chunks:
                self._bins = np.zeros(0, self._empty_dtype())
            elif len(self.bin_chunks) == 1:
                self._bins = self.bin_chunks[0]
            else:
                self._bins = np.concatenate(self.bin_chunks)
        return self._bins

    def _empty_dtype(self):
        return record_dtype(int(self.header.get("channels") or 0), int(self.header.get("behavior_dims") or 0), 0)

    def field(self, name, fill=np.nan):
        """One field of every bin record, in file order, across chunks of any shape.

        Fixed fields give a 1-D array; counts, behavior_in and behavior_out a (T, N) or
        (T, D) float32 array; latent and lag1 a (T, L) float32 array with L the largest
        state size, shorter states padded with `fill` (records no decoder saw have L = 0).
        """
        fixed = dict(FIXED_FIELDS)
        if name in fixed:
            parts = [c[name] for c in self.bin_chunks]
            return np.concatenate(parts) if parts else np.zeros(0, fixed[name])
        if name not in ARRAY_FIELDS:
            raise KeyError(f"no field {name!r} in a bin record (fields: "
                           f"{', '.join([n for n, _ in FIXED_FIELDS] + list(ARRAY_FIELDS))})")
        if not self.bin_chunks:
            return np.zeros((0, self._empty_dtype()[name].shape[0]), np.float32)
        widths = [c.dtype[name].shape[0] for c in self.bin_chunks]
        width = max(widths)
        if name not in ("latent", "lag1") and len(set(widths)) > 1:
            raise SessionError(f"{self.path}: {name} has different widths across chunks ({sorted(set(widths))})")
        out = np.full((self.n_bins, width), fill, np.float32)
        at = 0
        for c, w in zip(self.bin_chunks, widths):
            out[at:at + len(c), :w] = c[name].reshape(len(c), w)
            at += len(c)
        return out

    def __getitem__(self, name):
        return self.field(name)

    # --- events, models, clock ---------------------------------------------------------

    def events_of(self, kind):
        """The events of one kind, in the order written."""
        return [e for e in self.events if isinstance(e, dict) and e.get("kind") == kind]

    @property
    def decoders(self):
        """The `decoder` events: every model the session decoded with (file, sha256, ...)."""
        return self.events_of("decoder")

    @property
    def created(self):
        """header.created as an aware UTC datetime."""
        return parse_rfc3339(self.header["created"])

    def seconds(self, t_ns):
        """Seconds from header.created to host-monotonic time(s) t_ns (negative before it)."""
        t = np.asarray(t_ns).astype(np.int64) - np.int64(self.header["created_monotonic_ns"])
        return t.astype(np.float64) / 1e9

    def wall_time(self, t_ns):
        """The wall-clock (UTC) time of one host-monotonic stamp: created + (t_ns -
        created_monotonic_ns), to the microsecond. (latentloop writes `created` to the
        whole second, so this is as exact as that.)"""
        delta_ns = int(t_ns) - int(self.header["created_monotonic_ns"])
        return self.created + _dt.timedelta(microseconds=delta_ns / 1000)

    def path_of(self, name):
        return os.path.join(self.path, name)

    def __repr__(self):
        return f"<latentloop Session {self.path!r}: {self.status()}>"


def _shape_of(dtype):
    return (dtype["counts"].shape[0], dtype["behavior_in"].shape[0], dtype["latent"].shape[0])


def read_session(path):
    """Opens a session folder: reads session.json and scans records.lls once, checking
    every frame and payload, keeping the events, the end chunk and the bin records up to
    the first damage. Raises SessionError for what it refuses (see the module doc)."""
    path = os.fspath(path)
    hpath = os.path.join(path, HEADER_FILE)
    try:
        with open(hpath, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _bad(path, f"not a session folder: cannot read {HEADER_FILE} ({why})") from None
    try:
        header = json.loads(text)
    except ValueError as e:
        raise _bad(hpath, f"not valid JSON: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        fmt = header.get("format") if isinstance(header, dict) else None
        raise _bad(hpath, f"not a latentloop session header (format {json.dumps(fmt)})")
    v = header.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(hpath, "no format version")
    if v > VERSION:
        raise _bad(path, f"session format version {v} is newer than this latentloop reads ({VERSION}); "
                         "upgrade latentloop")
    s = Session(path, header)
    _scan(s)
    return s


def _scan(s):
    rpath = os.path.join(s.path, RECORDS_FILE)
    try:
        with open(rpath, "rb") as f:
            b = f.read()
    except OSError as e:
        raise _bad(rpath, f"cannot read {RECORDS_FILE} ({e.strerror or e})") from None
    n_bytes = len(b)
    if n_bytes < FILE_HEADER:
        s.damage = f"{RECORDS_FILE} is {n_bytes} bytes, shorter than its {FILE_HEADER}-byte header"
        return
    if b[:8] != MAGIC:
        raise _bad(rpath, "not a latentloop record stream (bad magic)")
    (v,) = struct.unpack_from("<I", b, 8)
    if v > VERSION:
        raise _bad(rpath, f"session format version {v} is newer than this latentloop reads ({VERSION}); "
                          "upgrade latentloop")
    at, n = FILE_HEADER, 0
    while at < n_bytes:
        def where(what):
            return f"chunk {n} at byte {at} of {RECORDS_FILE}: {what}"
        if n_bytes - at < CHUNK_HEADER:
            s.damage = where(f"cut off inside its header ({n_bytes - at} of {CHUNK_HEADER} bytes)")
            return
        magic, kind, encoding, _, stored, raw, crc, fcrc = _FRAME.unpack_from(b, at)
        if magic != CHUNK_MAGIC or zlib.crc32(b[at:at + 20]) != fcrc:
            s.damage = where("its frame is damaged (bad magic or frame checksum)")
            return
        body = at + CHUNK_HEADER
        if n_bytes - body < stored:
            s.damage = where(f"cut off ({n_bytes - body} of {stored} payload bytes)")
            return
        # Every chunk is checked, also a kind from a newer writer (then skipped).
        payload, why = _payload(b[body:body + stored], encoding, raw, crc)
        if why is not None:
            s.damage = where(why)
            return
        if kind in (CHUNK_BINS, CHUNK_EVENTS, CHUNK_END):
            if kind == CHUNK_BINS:
                if len(payload) < SHAPE_BYTES:
                    s.damage = where("a bins chunk without its shape")
                    return
                channels, dims, latents = _SHAPE.unpack_from(payload)
                dt = record_dtype(channels, dims, latents)
                if (len(payload) - SHAPE_BYTES) % dt.itemsize:
                    s.damage = where("its records do not fill it (damaged)")
                    return
                s.bin_chunks.append(np.frombuffer(payload, dt, offset=SHAPE_BYTES))
            else:
                text = payload.decode("utf-8", errors="replace")
                if kind == CHUNK_END:
                    try:
                        s.end = json.loads(text)
                    except ValueError:
                        s.end = None
                else:
                    for line in text.split("\n"):
                        line = line.rstrip("\r")
                        if not line:
                            continue
                        try:
                            s.events.append(json.loads(line))
                        except ValueError:
                            pass
        # Another chunk kind (a newer writer's): skipped, as the Rust reader does.
        at = body + stored
        n += 1


def _payload(stored, encoding, raw, crc):
    """(payload, None) or (None, why): checks the CRC, decompresses, checks the length."""
    if zlib.crc32(stored) != crc:
        return None, "its payload is damaged (checksum mismatch)"
    if encoding == ENCODING_RAW:
        out = bytes(stored)
    elif encoding == ENCODING_ZLIB:
        try:
            out = zlib.decompress(stored)
        except zlib.error as e:
            return None, f"cannot decompress its payload: {e}"
    else:
        return None, f"unknown payload encoding {encoding}"
    if len(out) != raw:
        return None, f"decompressed to {len(out)} bytes, the frame says {raw}"
    return out, None
