"""A latentloop session as an NWB 2.x file (pynwb, imported only when used).

    from latentloop.nwb import export_nwb
    info = export_nwb("reports/sim-lorenz/session", "session.nwb")

What goes where, and why:

- Times are seconds since `session_start_time`, which is the header's `created` moved back
  by whole seconds when anything was recorded before it (a calibration block, the start
  event), so that no time is negative. `notes` gives the exact mapping back to the host's
  CLOCK_MONOTONIC: t_ns = origin_ns + t * 1e9.
- acquisition/binned_counts: the counts of every bin record (T x N, "count"), at its
  receive time. NWB wants strictly ascending timestamps; records are written in the order
  the decode thread handled them (bins lost at acquisition land near, not exactly at, their
  place), so rows are sorted by receive time (then record number), and receive times that
  tie are moved apart by 1 ns each (the number moved is reported; the exact stamps stay
  in processing/decoder/bin_records). acquisition/received_behavior: the behaviour of the
  bins that carried some, same order.
- processing/decoder: what was published, at its publish time, in publish order:
  decoded_behavior, filtered_latent, lag1_latent (NaN-padded when a model swap changed the
  state size), kl (nats), and per-bin latencies in seconds (latency_receive_to_publish and
  its stages). bin_records: a table of every record's fixed fields (exact ns integers,
  decision, kind, flags), in the rows order of binned_counts. The module's description
  names every model (file, SHA-256, card); the rig config is verbatim in
  general/data_collection.
- intervals/latentloop_events: one row per event, start_time the event's t_ns (for events
  without one, the earliest time the file allows: the later of the previous event's time
  and the receive time of the record before the one it names), stop_time 1 ns later
  (nwbinspector wants stop > start; NWB core has no instantaneous event in TimeIntervals),
  sorted by time with `order` giving the file order. Event fields are unpacked into columns
  (nested objects by dotted path), each holding the value as JSON text (braces inside
  strings as \\u007b, \\u007d), because the inspector flags JSON objects stored in table
  cells; `read_events` puts them back.
- The subject comes from the config's [record.subject] or the caller; nwbinspector
  requires subject_id, species, sex and age (or date_of_birth).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import uuid

import numpy as np

from . import __version__
from .session import (BIT_HAS_BEHAVIOR, DECISION_NAMES, FIXED_FIELDS, KIND_NAMES, Session,
                      parse_rfc3339, read_session)

__all__ = ["export_nwb", "read_events", "ExportError", "SUBJECT_FIELDS", "EVENTS_TABLE"]

#: Subject fields pynwb's Subject takes (anything else in [record.subject] goes into its
#: description as "key: value" lines).
SUBJECT_FIELDS = ("subject_id", "species", "sex", "age", "age__reference", "date_of_birth", "description",
                  "genotype", "strain", "weight")
EVENTS_TABLE = "latentloop_events"
_EVENT_FIXED = ("kind", "record", "t_ns", "has_t_ns", "order")
_RESERVED = set(_EVENT_FIXED) | {"start_time", "stop_time", "tags", "tags_index", "timeseries",
                                 "timeseries_index", "id"}
_LATENCY = [  # name, from, to, what
    ("latency_receive_to_publish", "recv_ns", "publish_ns", "bin complete -> output sent (latentloop end to end)"),
    ("latency_acquire_to_ring", "recv_ns", "push_ns", "bin complete -> in the ring to the decoder"),
    ("latency_ring_wait", "push_ns", "pop_ns", "in the ring -> taken by the decoder"),
    ("latency_filter", "pop_ns", "step_ns", "taken -> filter step done"),
    ("latency_publish", "step_ns", "publish_ns", "step done -> output stamped and sent"),
]
_FIELD_DOC = {
    "index": "record number: the order the decode thread wrote the records (rows here are in receive order)",
    "seq": "sequence number, as received", "source_ts": "source timestamp, as received",
    "recv_ns": "host CLOCK_MONOTONIC ns: the bin was complete", "push_ns": "ns: it entered the ring to the decoder",
    "pop_ns": "ns: the decoder took it", "step_ns": "ns: the step was done (0: not decoded)",
    "publish_ns": "ns: the output was stamped and sent (0: none)",
    "skipped": "newer bins the decoder passed over to reach this one",
    "dropped_before": "bins dropped or missing before this output, as published",
    "kl": "KL(q_t || prediction) in nats, as published", "wire_flags": "LLBN flags received: 1 no data, 2 stream start",
    "out_flags": "LLOT flags published: 1 PREDICT_ONLY, 2 RESET, 4 REJECTED, 8 GAP, 16 RESTART (0 if none)",
    "decision": "what happened to the bin: " + ", ".join(f"{k} {v}" for k, v in DECISION_NAMES.items()),
    "kind": "the bin: " + ", ".join(f"{k} {v}" for k, v in KIND_NAMES.items()),
    "dtype": "counts received as: 0 u16, 1 u32, 2 f32 (LLBN), 3 binned by latentloop",
    "bits": "1 the bin carried behaviour, 2 the step was told it restarts the stream, 4 ZeroMQ refused the output",
    "records_lost_before": "records lost just before this one (a full recorder ring)",
}


class ExportError(ValueError):
    """A session that cannot be exported as asked (no bins, no pynwb, a bad subject)."""


def _pynwb():
    try:
        import pynwb  # noqa: F401
    except ImportError:
        raise ExportError("NWB export needs pynwb: pip install 'latentloop[nwb]' (or pip install pynwb)") from None
    return pynwb


def _note(msg):
    print(f"note: {msg}", file=sys.stderr)


# --- event fields <-> columns --------------------------------------------------------

_QUOTE = {"%": "%25", ".": "%2E", "[": "%5B", "]": "%5D", "/": "%2F", ":": "%3A"}
_PATH_TOKEN = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def _quote(key):
    return "".join(_QUOTE.get(c, c) for c in key) if key else "%"


def _unquote(seg):
    if seg == "%":
        return ""
    return re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), seg)


def _holds_object(v):
    return isinstance(v, dict) or (isinstance(v, list) and any(_holds_object(x) for x in v))


def _flatten(value, path, out):
    """Leaves of a JSON value by dotted path (list items as [i] where a list holds
    objects), each as JSON text; an empty object or a list of plain values is one leaf."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, (path + "." if path else "") + _quote(str(k)), out)
    elif isinstance(value, list) and _holds_object(value):
        for i, v in enumerate(value):
            _flatten(v, f"{path}[{i}]", out)
    else:
        text = json.dumps(value, ensure_ascii=False)
        # Outside "{}" a brace here is inside a string: written as a JSON escape, so that a
        # reason like "bad {a: 1}" does not trip the inspector's dict-in-a-cell check.
        out[path] = text if text == "{}" else text.replace("{", "\\u007b").replace("}", "\\u007d")


def _put(root, path, value):
    toks = [int(i) if i else _unquote(k) for i, k in _PATH_TOKEN.findall(path)]
    cur = root
    for n, tok in enumerate(toks):
        last = n == len(toks) - 1
        fresh = (lambda: []) if not last and isinstance(toks[n + 1], int) else (lambda: {})
        if isinstance(tok, int):
            while len(cur) <= tok:
                cur.append(None)
            if last:
                cur[tok] = value
            else:
                if cur[tok] is None:
                    cur[tok] = fresh()
                cur = cur[tok]
        elif last:
            cur[tok] = value
        else:
            cur = cur.setdefault(tok, fresh())


def _column_of(path):
    return "_" + path if path.startswith("_") or path in _RESERVED else path


def _path_of(column):
    return column[1:] if column.startswith("_") else column


def read_events(nwbfile_or_table):
    """The session's events from an exported file (an NWBFile or its events table), as
    dicts in the order the session wrote them."""
    t = nwbfile_or_table
    if hasattr(t, "intervals"):
        if t.intervals is None or EVENTS_TABLE not in t.intervals:
            return []
        t = t.intervals[EVENTS_TABLE]
    fixed = {name: np.asarray(t[name].data[:]) for name in _EVENT_FIXED}
    payload = [c for c in t.colnames if c not in _RESERVED]
    cols = {c: list(t[c].data[:]) for c in payload}
    events = []
    for i in range(len(fixed["order"])):
        ev = {}
        kind = fixed["kind"][i]
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind:
            ev["kind"] = kind
        if fixed["record"][i] >= 0:
            ev["record"] = int(fixed["record"][i])
        if fixed["has_t_ns"][i]:
            ev["t_ns"] = int(fixed["t_ns"][i])
        for c in payload:
            v = cols[c][i]
            v = v.decode() if isinstance(v, bytes) else v
            if v != "":
                _put(ev, _path_of(c), json.loads(v))
        events.append((int(fixed["order"][i]), ev))
    return [ev for _, ev in sorted(events, key=lambda p: p[0])]


# --- export --------------------------------------------------------------------------


def _ns_to_s(ns, origin_ns):
    return (np.asarray(ns).astype(np.int64) - np.int64(origin_ns)).astype(np.float64) / 1e9


def _strictly_ascending(ns):
    """Sorted int64 ns made strictly ascending: each tie moved 1 ns after the one before."""
    if len(ns) == 0:
        return ns, 0
    k = np.arange(len(ns), dtype=np.int64)
    out = np.maximum.accumulate(ns - k) + k
    return out, int(np.count_nonzero(out != ns))


def _event_times(events, recv_ns):
    """Each event's time in ns: its t_ns; for one without, the earliest time the file allows:
    the later of the previous event's time and the receive time of the record before the
    one it names (it happened before that record, after the events written before it)."""
    out, prev, n = [], None, len(recv_ns)
    for e in events:
        t, r = e.get("t_ns"), e.get("record")
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 0):
            r = r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else n
            bounds = ([prev] if prev is not None else []) + ([int(recv_ns[min(r, n) - 1])] if r >= 1 else [])
            t = max(bounds) if bounds else int(recv_ns[0])
        out.append(t)
        prev = t
    return out


def _subject(header, overrides, notes):
    """pynwb Subject kwargs from [record.subject] and the caller's overrides (None drops
    nothing); unknown keys go into the description. Notes what nwbinspector would flag."""
    given = dict(header.get("subject") or {})
    for k, v in (overrides or {}).items():
        if v is not None:
            given[k] = v
    if not given:
        notes.append("no subject ([record.subject] or --subject-id/--species/--sex/--age): nwbinspector "
                     "reports a missing subject as CRITICAL")
        return None
    kw, extra = {}, []
    for k, v in given.items():
        if isinstance(v, dict) and len(v) == 1 and "datetime" in next(iter(v)):  # a TOML datetime via serde
            v = next(iter(v.values()))
        if k == "date_of_birth":
            try:
                kw[k] = parse_rfc3339(v) if "T" in str(v) else _dt.datetime.fromisoformat(str(v)).replace(
                    tzinfo=_dt.timezone.utc)
            except ValueError:
                raise ExportError(f"subject date_of_birth {v!r} is not an ISO 8601 date or time") from None
        elif k == "weight" and isinstance(v, (int, float)) and not isinstance(v, bool):
            kw[k] = float(v)
        elif k in SUBJECT_FIELDS:
            kw[k] = v if isinstance(v, str) else json.dumps(v)
        else:
            extra.append(f"{k}: {v if isinstance(v, str) else json.dumps(v)}")
    if extra:
        kw["description"] = "\n".join(([kw["description"]] if kw.get("description") else []) + extra)
    kw.setdefault("description", "The subject of this latentloop session, as the rig config's [record.subject] "
                                 "(or the exporter's options) gave it.")
    missing = [k for k in ("subject_id", "species", "sex") if not kw.get(k)]
    if not kw.get("age") and not kw.get("date_of_birth"):
        missing.append("age (or date_of_birth)")
    if missing:
        notes.append(f"the subject has no {', '.join(missing)}: nwbinspector will flag it")
    if kw.get("sex") and kw["sex"] not in ("M", "F", "O", "U"):
        notes.append(f"subject sex {kw['sex']!r} is not one of M, F, O, U: nwbinspector reports it as CRITICAL")
    for k in ("subject_id",):
        if "/" in kw.get(k, ""):
            raise ExportError(f"subject {k} {kw[k]!r} contains '/', which NWB (DANDI) paths cannot hold")
    return kw


def _models_text(s):
    out = []
    for e in s.decoders:
        carry = "; state carried over" if e.get("carry_state") else ""
        out.append(f"change {e.get('change')}: {e.get('file')} sha256 {e.get('sha256')} ({e.get('describe')}; "
                   f"from {e.get('origin')}{carry})")
    if not out and s.header.get("model"):
        m = s.header["model"]
        out.append(f"{m.get('file')} sha256 {m.get('sha256')} ({m.get('describe')}; from {m.get('origin')})")
    return out


def export_nwb(session, out_path, subject=None, metadata=None, quiet=False):
    """Writes `session` (a folder or a Session) as the NWB file `out_path` (atomically:
    written beside it, then renamed). `subject` overrides [record.subject] fields;
    `metadata` overrides description, experimenter, institution, session_id.
    Returns a dict: path, bins, published, events, origin_ns, shift_s, ties, notes (what
    nwbinspector would flag, ties moved; also printed on stderr unless `quiet`), status.
    Refuses a session without bin records (ExportError)."""
    s = session if isinstance(session, Session) else read_session(session)
    if s.n_bins == 0:
        raise ExportError(f"{s.path}: the session holds no bin records, nothing to export ({s.status()})")
    pynwb = _pynwb()
    from pynwb import NWBHDF5IO, NWBFile, ProcessingModule, TimeSeries
    from pynwb.epoch import TimeIntervals
    from pynwb.file import Subject
    from hdmf.common import DynamicTable, VectorData

    h, notes = s.header, []
    meta = dict(h.get("metadata") or {})
    meta.update({k: v for k, v in (metadata or {}).items() if v is not None})
    description = (metadata or {}).get("description") or h.get("description") or "latentloop closed-loop session"
    subject_kw = _subject(h, subject, notes)
    if "/" in str(meta.get("session_id", "")):
        raise ExportError(f"session_id {meta['session_id']!r} contains '/', which NWB (DANDI) paths cannot hold")

    f = {name: s[name] for name, _ in FIXED_FIELDS if name != "_reserved"}
    n = s.n_bins
    events = [e for e in s.events if isinstance(e, dict)]
    ev_ns = _event_times(events, f["recv_ns"])
    published = np.flatnonzero(f["publish_ns"] > 0)
    mono = int(h["created_monotonic_ns"])
    earliest = min([int(f["recv_ns"].min())] + ev_ns + ([int(f["publish_ns"][published].min())] if len(published) else []))
    shift = 0 if earliest >= mono else -(-(mono - earliest) // 1_000_000_000)  # whole seconds, rounded up
    origin_ns = mono - shift * 1_000_000_000
    try:
        start = s.created - _dt.timedelta(seconds=shift)
    except (KeyError, ValueError) as e:
        raise ExportError(f"{s.path}: the header's created time is unreadable ({e})") from None

    recv_order = np.lexsort((f["index"], f["recv_ns"]))
    recv_ns, ties = _strictly_ascending(f["recv_ns"][recv_order].astype(np.int64))
    recv_t = _ns_to_s(recv_ns, origin_ns)
    pub_order = published[np.lexsort((f["index"][published], f["publish_ns"][published]))]
    pub_ns, pub_ties = _strictly_ascending(f["publish_ns"][pub_order].astype(np.int64))
    pub_t = _ns_to_s(pub_ns, origin_ns)
    if ties or pub_ties:
        notes.append(f"{ties} receive and {pub_ties} publish times tied with the one before and were moved "
                     "1 ns later each (NWB timestamps must ascend strictly)")
    n_ch = s["counts"].shape[1]
    if n < n_ch:
        notes.append(f"{n} bins but {n_ch} channels: nwbinspector will say binned_counts may be in the wrong "
                     "orientation (time is its first axis; the session is just short)")

    models = _models_text(s)
    dec = h.get("decoder") or {}
    status = s.status()
    note_lines = [
        f"Recorded by latentloop {h.get('latentloop_version')} (git {h.get('git_commit')}), session format "
        f"version {h.get('version')}; exported by the latentloop Python package {__version__}.",
        f"Session status: {status}.",
        f"Source: {h.get('source')}, {h.get('channels')} channels in {h.get('bin_ms')} ms bins, "
        f"{h.get('behavior_dims')} behaviour dims. Rig config: {h.get('config_path')} (verbatim in data_collection).",
        "Decoder options: " + ", ".join(f"{k} {json.dumps(v)}" for k, v in dec.items()) + ".",
        "Models: " + ("; ".join(models) if models else "none (no decoder was defined)") + ".",
        f"Times are seconds since session_start_time; t corresponds to host CLOCK_MONOTONIC ns "
        f"{origin_ns} + t * 1e9 (the header's created_monotonic_ns {mono} is at header.created {h.get('created')}"
        + (f", {shift} s after session_start_time: records or events precede the header" if shift else "") + ").",
        "Rows of acquisition/binned_counts and processing/decoder/bin_records are the bin records in receive order; "
        "the decoder's series are the published records in publish order.",
    ]
    kw = dict(
        session_description=description,
        identifier=str(uuid.uuid4()),
        session_start_time=start,
        timestamps_reference_time=start,
        experiment_description=(f"Closed-loop decoding by latentloop: a {h.get('source')} source, "
                                f"{h.get('channels')} channels in {h.get('bin_ms')} ms bins, decoded bin by bin "
                                "and published on ZeroMQ."),
        keywords=["latentloop", "closed-loop", "neural decoding", "brain-computer interface"],
        notes="\n".join(note_lines),
    )
    if h.get("config_text"):
        kw["data_collection"] = h["config_text"]
    for k in ("experimenter", "institution", "session_id"):
        if meta.get(k):
            kw[k] = meta[k]
    if "was_generated_by" in [a["name"] for a in NWBFile.__init__.__docval__["args"]]:
        kw["was_generated_by"] = [["latentloop", str(h.get("latentloop_version"))],
                                  ["latentloop-python", __version__], ["pynwb", pynwb.__version__]]
    if subject_kw is not None:
        kw["subject"] = Subject(**subject_kw)
    nwb = NWBFile(**kw)

    nwb.add_acquisition(TimeSeries(
        name="binned_counts", data=s["counts"][recv_order], unit="count", resolution=-1.0,
        timestamps=recv_t, description=(
            "Spike counts of every bin record latentloop received (bins x channels, float32 as recorded: u16/u32 "
            "counts are exact), at the time the bin was complete; rows in receive order (processing/decoder/"
            "bin_records: the same rows, with their record numbers, decisions and exact ns stamps).")))
    has_b = (f["bits"][recv_order] & BIT_HAS_BEHAVIOR) != 0
    if s["behavior_in"].shape[1] and has_b.any():
        nwb.add_acquisition(TimeSeries(
            name="received_behavior", data=s["behavior_in"][recv_order][has_b], unit="a.u.", resolution=-1.0,
            timestamps=recv_t[has_b], description="Behaviour the bins carried (calibration targets or ground "
            "truth, in the units the source sent), at the bins' receive times."))

    mod = ProcessingModule(name="decoder", description=(
        "What latentloop's decoder published for each decoded bin, at its publish time; per-bin latencies; every "
        "bin record's fields. Models: " + ("; ".join(models) if models else "none") + ". Decoder options: "
        + json.dumps(dec, sort_keys=True) + "."))
    nwb.add_processing_module(mod)
    if len(pub_order):
        ts_owner = None
        series = []
        if s["behavior_out"].shape[1]:
            series.append(("decoded_behavior", s["behavior_out"][pub_order], "a.u.",
                           "Decoded behaviour as published (the LLOT output), in the units of the training behaviour."))
        lat = s["latent"][pub_order]
        if lat.shape[1]:
            pad = " Shorter states are padded with NaN (a model swap changed the state size)." \
                if np.isnan(lat).any() else ""
            series.append(("filtered_latent", lat, "a.u.", "Filtered latent mean m_t as published "
                           "(for a Kalman decoder its state [behaviour; 1])." + pad))
            series.append(("lag1_latent", s["lag1"][pub_order], "a.u.",
                           "Lag-1 smoothed mean m_{t-1|t} as published." + pad))
        series.append(("kl", f["kl"][pub_order], "nats", "KL(q_t || prediction) as published (0 for a "
                       "predict-only step)."))
        for name, a, b, what in _LATENCY:
            x, y = f[a][pub_order].astype(np.int64), f[b][pub_order].astype(np.int64)
            d = np.where((x > 0) & (y > 0), (y - x).astype(np.float64) / 1e9, np.nan)
            series.append((name, d, "seconds", f"Per-bin latency: {what} (host CLOCK_MONOTONIC; NaN where a "
                           "stamp is missing)."))
        for name, data, unit, desc in series:
            ts = TimeSeries(name=name, data=data, unit=unit, resolution=-1.0, description=desc,
                            timestamps=pub_t if ts_owner is None else ts_owner)
            if ts_owner is None:
                ts_owner = ts
            mod.add(ts)
    cols = [VectorData(name=name, description=_FIELD_DOC[name], data=f[name][recv_order])
            for name, _ in FIXED_FIELDS if name != "_reserved"]
    mod.add(DynamicTable(name="bin_records", description=(
        "The fixed fields of every bin record (docs/SESSION.md), exact, one row per row of "
        "acquisition/binned_counts (receive order; `index` is the file order)."), columns=cols))

    if events:
        _add_events(nwb, TimeIntervals, VectorData, events, ev_ns, origin_ns)
    for msg in notes:
        if not quiet:
            _note(msg)

    out_path = os.fspath(out_path)
    base, ext = os.path.splitext(out_path)
    tmp = f"{base}.tmp-{os.getpid()}{ext or '.nwb'}"
    try:
        with NWBHDF5IO(tmp, "w") as io:
            io.write(nwb)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dict(path=out_path, bins=n, published=int(len(pub_order)), events=len(events), origin_ns=origin_ns,
                shift_s=shift, ties=ties + pub_ties, notes=notes, status=status)


def _add_events(nwb, TimeIntervals, VectorData, events, ev_ns, origin_ns):
    kinds, records, tns, has_t, payloads = [], [], [], [], []
    for e in events:
        k, r, t = e.get("kind"), e.get("record"), e.get("t_ns")
        rest = dict(e)
        ok_k = isinstance(k, str)
        ok_r = isinstance(r, int) and not isinstance(r, bool) and r >= 0
        ok_t = isinstance(t, int) and not isinstance(t, bool) and t >= 0
        for key, ok in (("kind", ok_k), ("record", ok_r), ("t_ns", ok_t)):
            if ok:
                rest.pop(key)
        kinds.append(k if ok_k else "")
        records.append(r if ok_r else -1)
        tns.append(t if ok_t else 0)
        has_t.append(ok_t)
        flat = {}
        _flatten(rest, "", flat)
        flat.pop("", None)  # an event with nothing else: {} flattens to one empty-path leaf
        payloads.append(flat)
    order = np.lexsort((np.arange(len(events)), np.asarray(ev_ns, np.int64)))
    start = _ns_to_s(np.asarray(ev_ns, np.int64)[order], origin_ns)
    paths = list(dict.fromkeys(p for fl in payloads for p in fl))
    cols = [
        VectorData(name="start_time", description="the event's time (seconds): its t_ns; for an event without one, "
                   "the later of the previous event's time and the receive time of the record before the one it "
                   "names", data=start),
        VectorData(name="stop_time", description="start_time + 1 ns (events are instants)", data=start + 1e-9),
        VectorData(name="kind", description="the event's kind (docs/SESSION.md)", data=[kinds[i] for i in order]),
        VectorData(name="record", description="the bin record the event came before (-1: none)",
                   data=np.asarray(records, np.int64)[order]),
        VectorData(name="t_ns", description="the event's host CLOCK_MONOTONIC ns (0 when it has none)",
                   data=np.asarray(tns, np.uint64)[order]),
        VectorData(name="has_t_ns", description="whether the event has a t_ns", data=np.asarray(has_t, bool)[order]),
        VectorData(name="order", description="the event's position in the session (events are sorted by time here)",
                   data=order.astype(np.int64)),
    ]
    for p in paths:
        cols.append(VectorData(name=_column_of(p), description=f"the event field {p} as JSON text (empty: the "
                               "event has no such field; '.' and [i] are object and list paths, %XX escapes)",
                               data=[payloads[i].get(p, "") for i in order]))
    nwb.add_time_intervals(TimeIntervals(name=EVENTS_TABLE, description=(
        "latentloop's session events (start, decoder, applied, control, rejected, stop, ...), one per row, "
        "sorted by time; read them back with latentloop.nwb.read_events."), columns=cols))
