"""An NWB file with sorted units (NLB's MC_Maze, FALCON, DANDI sets) as the .npz that
`latentloop fit` and `latentloop eval` read: spikes (T x N counts), behavior (T x D),
dt (seconds), trial_starts (bin indices).

    from latentloop.nwb_to_npz import convert
    info = convert("sub-Jenkins_ses-full_desc-train_behavior+ecephys.nwb", "maze.npz", bin_ms=20)

How the bins are made, and why:

- Spikes come from a Units table's `spike_times` (`nwbfile.units`, or a table with that
  column in a processing module; `units=` picks one by name). Bin k is [t0 + k dt,
  t0 + (k+1) dt): a spike exactly on an edge goes to the later bin, as with numpy's
  `histogram` edges. `obs_intervals` are not used: a unit counts 0 where it was not
  observed (the file's own convention for "no spikes").
- t0 (`start`) defaults to the first trial's start_time, else the first spike. `stop`
  given: the whole bins in [start, stop). Not given: enough bins to hold the last spike
  and the last trial's stop_time.
- Behaviour is one TimeSeries of processing["behavior"], directly there or inside a
  container (Position, BehavioralTimeSeries, ...): the one named `behavior=` (its name or
  "Container/name"), else the first numeric one (stderr says which, and what else is
  there). It is resampled to the bins per dimension: the mean of the finite samples inside
  a bin when there are any (a denser signal, e.g. 1 kHz hand velocity into 20 ms bins);
  otherwise linear interpolation at the bin centre between the nearest finite samples, held
  constant beyond the first and last (a sparser signal, or gaps). Data are in the series'
  units (data * conversion + offset).
- trial_starts: the bin of each trial's start_time (trials outside the bins are dropped,
  and two trials starting in one bin give one entry; stderr says so).

The .npz holds spikes (int32), behavior (float32), dt (float64), trial_starts (int64) and,
for people, t_start (float64, seconds of bin 0's left edge in the file's time) and
unit_ids (int64). latentloop reads only the first four (and latents/rates, never written
here), so nothing in it can be misread.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

__all__ = ["convert", "bin_nwbfile", "ConvertError"]


class ConvertError(ValueError):
    """An NWB file that cannot be converted as asked."""


def _say(msg):
    print(msg, file=sys.stderr)


def _units_tables(nwb):
    from hdmf.common import DynamicTable

    found = []
    if nwb.units is not None:
        found.append(("units", nwb.units))
    for mname, mod in nwb.processing.items():
        for name, obj in mod.data_interfaces.items():
            if isinstance(obj, DynamicTable) and "spike_times" in obj.colnames:
                found.append((f"processing/{mname}/{name}", obj))
    return found


def _pick_units(nwb, name):
    tables = _units_tables(nwb)
    if not tables:
        raise ConvertError("the file has no Units table (no nwbfile.units, no table with spike_times in processing)")
    if name is None:
        return tables[0]
    for path, t in tables:
        if name in (path, path.rsplit("/", 1)[-1]):
            return path, t
    raise ConvertError(f"no units table {name!r}; the file has: {', '.join(p for p, _ in tables)}")


def _spike_trains(table):
    col = table["spike_times"]
    if not hasattr(col, "target"):  # one spike time per row: not a ragged column
        raise ConvertError("the units table's spike_times is not a ragged (indexed) column")
    flat = np.asarray(col.target.data[:], np.float64)
    ends = np.asarray(col.data[:], np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
    return [flat[a:b] for a, b in zip(starts, ends)]


def _behavior_candidates(nwb):
    """(name, TimeSeries) in processing["behavior"], containers' children as Container/name."""
    from pynwb import TimeSeries

    if "behavior" not in nwb.processing:
        return []
    out = []
    for name, obj in nwb.processing["behavior"].data_interfaces.items():
        if isinstance(obj, TimeSeries):
            out.append((name, obj))
        else:
            for child in getattr(obj, "children", []):
                if isinstance(child, TimeSeries):
                    out.append((f"{name}/{child.name}", child))
    return out


def _numeric(ts):
    try:
        dt = np.dtype(ts.data.dtype)
    except (AttributeError, TypeError):
        dt = np.asarray(ts.data[:1]).dtype
    return dt.kind in "iuf" and len(getattr(ts.data, "shape", (0,))) in (1, 2)


def _pick_behavior(nwb, name):
    cands = _behavior_candidates(nwb)
    if name is not None:
        for full, ts in cands:
            if name in (full, full.rsplit("/", 1)[-1]):
                return full, ts, [c for c, _ in cands if c != full]
        raise ConvertError(f"no behaviour series {name!r} in processing/behavior; it has: "
                           f"{', '.join(c for c, _ in cands) or 'nothing'}")
    for full, ts in cands:
        if _numeric(ts):
            return full, ts, [c for c, _ in cands if c != full]
    return None, None, [c for c, _ in cands]


def _series_times(ts):
    if ts.timestamps is not None:
        return np.asarray(ts.timestamps[:], np.float64)
    n = len(ts.data)
    rate = ts.rate
    if not rate or rate <= 0:
        raise ConvertError(f"behaviour series {ts.name!r} has neither timestamps nor a positive rate")
    return float(ts.starting_time or 0.0) + np.arange(n, dtype=np.float64) / float(rate)


def _resample(t, x, edges):
    """Per dimension: mean of the finite samples in each bin, else linear interpolation at
    the bin centre (held beyond the ends). Returns (T x D float32, bins interpolated)."""
    T = len(edges) - 1
    order = np.argsort(t, kind="stable")
    t, x = t[order], x[order]
    k = np.searchsorted(edges, t, side="right") - 1
    inside = (k >= 0) & (k < T)
    centres = (edges[:-1] + edges[1:]) / 2
    out = np.zeros((T, x.shape[1]), np.float64)
    interpolated = 0
    for d in range(x.shape[1]):
        col = x[:, d]
        ok = np.isfinite(col)
        if not ok.any():
            raise ConvertError(f"behaviour dimension {d} has no finite sample")
        sel = inside & ok
        sums = np.bincount(k[sel], weights=col[sel], minlength=T)
        counts = np.bincount(k[sel], minlength=T)
        empty = counts == 0
        out[~empty, d] = sums[~empty] / counts[~empty]
        if empty.any():
            out[empty, d] = np.interp(centres[empty], t[ok], col[ok])
        interpolated = max(interpolated, int(empty.sum()))
    return out.astype(np.float32), interpolated


def bin_nwbfile(nwb, bin_ms, units=None, behavior=None, start=None, stop=None, say=_say):
    """The arrays of the .npz from an open pynwb NWBFile (see the module doc)."""
    if not (isinstance(bin_ms, (int, float)) and math.isfinite(bin_ms) and bin_ms > 0):
        raise ConvertError(f"--bin-ms must be a positive number of milliseconds, got {bin_ms}")
    dt = float(bin_ms) / 1000.0
    upath, table = _pick_units(nwb, units)
    trains = _spike_trains(table)
    if not trains:
        raise ConvertError(f"the units table {upath} has no units")
    ids = np.asarray(table.id.data[:], np.int64)
    nonempty = [tr for tr in trains if len(tr)]
    if not nonempty:
        raise ConvertError(f"the units table {upath} has no spikes")
    first_spike = min(float(tr.min()) for tr in nonempty)
    last_spike = max(float(tr.max()) for tr in nonempty)
    trials = nwb.trials
    t_starts = np.asarray(trials["start_time"].data[:], np.float64) if trials is not None and len(trials) else None
    t_stops = np.asarray(trials["stop_time"].data[:], np.float64) if t_starts is not None else None
    if start is None:
        start = float(np.nanmin(t_starts)) if t_starts is not None else first_spike
    if stop is not None:
        if stop <= start:
            raise ConvertError(f"--stop {stop} is not after the start {start}")
        T = int(math.floor((stop - start) / dt + 1e-9))
    else:
        T = int(math.floor((last_spike - start) / dt)) + 1
        if t_stops is not None and np.isfinite(t_stops).any():
            T = max(T, int(math.ceil((float(np.nanmax(t_stops)) - start) / dt - 1e-9)))
    if T <= 0:
        raise ConvertError(f"no whole {bin_ms} ms bin between {start} s and {stop if stop is not None else last_spike} s")
    edges = start + np.arange(T + 1, dtype=np.float64) * dt
    spikes = np.zeros((T, len(trains)), np.int32)
    outside = 0
    for j, tr in enumerate(trains):
        k = np.searchsorted(edges, tr, side="right") - 1
        ok = (k >= 0) & (k < T)
        outside += int((~ok).sum())
        spikes[:, j] = np.bincount(k[ok], minlength=T)
    say(f"spikes: {upath}, {len(trains)} units, {int(spikes.sum())} spikes in {T} bins of {bin_ms} ms from "
        f"{start:.6f} s" + (f" ({outside} spikes outside the bins not counted)" if outside else ""))
    if "obs_intervals" in table.colnames:
        say("spikes: obs_intervals are not used (a unit counts 0 outside its observed intervals)")
    out = {"spikes": spikes, "dt": np.float64(dt), "t_start": np.float64(start), "unit_ids": ids}

    bname, ts, others = _pick_behavior(nwb, behavior)
    if ts is not None:
        t = _series_times(ts)
        x = np.asarray(ts.data[:], np.float64)
        x = x.reshape(len(x), -1) * float(ts.conversion or 1.0) + float(getattr(ts, "offset", 0.0) or 0.0)
        if len(t) != len(x):
            raise ConvertError(f"behaviour series {bname!r}: {len(t)} timestamps for {len(x)} samples")
        out["behavior"], interp = _resample(t, x, edges)
        how = "mean of the samples in each bin" + (
            f"; linear interpolation at the bin centre for {interp} bins without a finite sample" if interp else "")
        say(f"behavior: processing/behavior/{bname} ({x.shape[1]} dims, {len(x)} samples; {how})"
            + (f"; also there: {', '.join(others)}" if others else ""))
    elif others:
        say(f"behavior: none numeric in processing/behavior ({', '.join(others)})")

    if t_starts is not None:
        k = np.searchsorted(edges, t_starts[np.isfinite(t_starts)], side="right") - 1
        keep = k[(k >= 0) & (k < T)]
        uniq = np.unique(keep).astype(np.int64)
        dropped, merged = len(t_starts) - len(keep), len(keep) - len(uniq)
        say(f"trials: {len(uniq)} trial starts" + (f"; {dropped} outside the bins dropped" if dropped else "")
            + (f"; {merged} sharing a bin with another merged" if merged else ""))
        out["trial_starts"] = uniq
    return out


def convert(nwb_path, out_path, bin_ms, units=None, behavior=None, start=None, stop=None, say=_say):
    """Reads `nwb_path`, bins it (bin_nwbfile) and writes `out_path` atomically. Returns
    the arrays written."""
    try:
        from pynwb import NWBHDF5IO
    except ImportError:
        raise ConvertError("nwb-to-npz needs pynwb: pip install 'latentloop[nwb]' (or pip install pynwb)") from None
    if not os.path.isfile(nwb_path):
        raise ConvertError(f"{nwb_path}: no such file")
    try:
        io = NWBHDF5IO(os.fspath(nwb_path), "r")
    except Exception as e:  # h5py/hdmf raise many kinds for a file that is not NWB
        raise ConvertError(f"{nwb_path}: not a readable NWB (HDF5) file ({type(e).__name__}: {e})") from None
    try:
        try:
            nwb = io.read()
        except Exception as e:
            raise ConvertError(f"{nwb_path}: pynwb cannot read it ({type(e).__name__}: {e})") from None
        arrays = bin_nwbfile(nwb, bin_ms, units=units, behavior=behavior, start=start, stop=stop, say=say)
    finally:
        io.close()
    out_path = os.fspath(out_path)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return arrays
