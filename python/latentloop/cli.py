"""`python -m latentloop`: export-nwb, nwb-to-npz, session-info, import-xfads.

Bad input (a missing folder, a file that is not a session or not NWB, a bad option) is
reported as one line `error: ...` on stderr with exit status 2, never a traceback: these
commands run at the end of an experiment, by people who need to know what to fix, not
where in the code it was noticed. LATENTLOOP_DEBUG=1 shows the traceback of an unexpected
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from . import __version__

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line, like every other error here."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _parser():
    p = _Parser(prog="python -m latentloop", description=(
        "Tools for latentloop sessions and data sets: export a recorded session as NWB, read its summary, "
        "bin an NWB file's spikes into the .npz that `latentloop fit`/`eval` read."),
        epilog="Errors are one 'error: ...' line on stderr, exit status 2. Needs numpy; the NWB commands need "
               "pynwb (pip install 'latentloop[nwb]').")
    p.add_argument("--version", action="version", version=f"latentloop (Python) {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("export-nwb", help="write a recorded session as an NWB 2.x file", description=(
        "Writes SESSION (a folder `latentloop run` recorded) as the NWB file OUT: every bin's counts in "
        "acquisition, what the decoder published and per-bin latencies in processing/decoder, the events in "
        "intervals/latentloop_events. The subject comes from the config's [record.subject]; the options below "
        "override its fields (nwbinspector requires subject id, species, sex and age)."))
    e.add_argument("session", metavar="SESSION", help="the session folder (holds session.json and records.lls)")
    e.add_argument("out", metavar="OUT.nwb", help="the NWB file to write (replaced if it exists)")
    g = e.add_argument_group("subject (overrides [record.subject])")
    g.add_argument("--subject-id")
    g.add_argument("--species", help="Latin binomial, e.g. 'Macaca mulatta'")
    g.add_argument("--sex", help="M, F, O (other) or U (unknown)")
    g.add_argument("--age", help="ISO 8601 duration, e.g. P90D")
    g.add_argument("--date-of-birth", help="ISO 8601 date, e.g. 2021-03-04")
    g.add_argument("--strain")
    g.add_argument("--genotype")
    g.add_argument("--weight", help="e.g. '0.025 kg'")
    g.add_argument("--subject-description")
    m = e.add_argument_group("session (overrides [record])")
    m.add_argument("--description", help="session_description (default: [record] description)")
    m.add_argument("--experimenter", action="append", help="'Last, First'; repeat for several")
    m.add_argument("--institution")
    m.add_argument("--session-id")

    c = sub.add_parser("nwb-to-npz", help="bin an NWB file's units into a latentloop .npz", description=(
        "Bins the spike times of IN's Units table into counts of --bin-ms, resamples a behaviour series of "
        "processing/behavior to the bins (mean of the samples in a bin; linear interpolation at the bin centre "
        "where a bin has none), and writes OUT.npz with spikes, behavior, dt and trial_starts (bin indices of the "
        "trials' start_time). What was chosen is said on stderr."))
    c.add_argument("input", metavar="IN.nwb")
    c.add_argument("out", metavar="OUT.npz")
    c.add_argument("--bin-ms", type=float, required=True, help="bin width in milliseconds")
    c.add_argument("--units", metavar="NAME", help="the units table (default: nwbfile.units, else the first "
                   "table with spike_times in a processing module)")
    c.add_argument("--behavior", metavar="NAME", help="the behaviour series in processing/behavior, by name or "
                   "Container/name (default: the first numeric one)")
    c.add_argument("--start", type=float, metavar="S", help="seconds, the left edge of bin 0 (default: the first "
                   "trial's start, else the first spike)")
    c.add_argument("--stop", type=float, metavar="S", help="seconds: whole bins up to here (default: through "
                   "the last spike and the last trial's stop)")

    i = sub.add_parser("session-info", help="summarise a recorded session", description=(
        "Prints what SESSION holds: what ran, the bins and what happened to them, latencies, events, and whether "
        "it ended cleanly (damage is named by chunk and byte)."))
    i.add_argument("session", metavar="SESSION")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")

    x = sub.add_parser("import-xfads", help="convert an xfads checkpoint into a latentloop model file", description=(
        "Reads CHECKPOINT (a PyTorch Lightning .ckpt, a torch.save'd state_dict .pt, or a .safetensors state dict) "
        "with numpy, without torch and without running anything its pickle names, and writes MODEL.safetensors: "
        "the tensors of one xfads model that latentloop maps, under their xfads names without the prefix, and the "
        "metadata the weights cannot give (dt, rmsnorm, likelihood, dynamics, samples, xfads_prefix). The backward "
        "encoder (it reads future bins) and the filter's copies are dropped; an input network or any tensor "
        "latentloop does not map refuses the import. What was taken and dropped is said on stderr."),
        epilog="A .safetensors input's own metadata (dt, rmsnorm, likelihood, samples) stands in for a missing "
               "option, and must agree with a given one.")
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="a Lightning .ckpt, a state_dict .pt or a .safetensors")
    x.add_argument("--out", metavar="MODEL.safetensors", required=True, help="the model file to write (replaced)")
    x.add_argument("--dt", type=float, metavar="SECONDS", help="bin width in seconds, xfads's cfg.bin_sz "
                   "(required: no checkpoint saves it)")
    x.add_argument("--prefix", metavar="PREFIX", help="the model to take, by its names' prefix, e.g. 'ssm.' "
                   "(default: the only one; '' for names without one)")
    x.add_argument("--rmsnorm", choices=["true", "false"], help="xfads's cfg.use_layer_norm; required for GRU "
                   "dynamics (it leaves no trace in the weights), false for linear and diffusion")
    x.add_argument("--likelihood", choices=["poisson", "gaussian", "bernoulli"], help="the observation model; "
                   "required unless it is Gaussian (Poisson and Bernoulli have the same tensors)")
    x.add_argument("--samples", type=int, metavar="S", help="samples per bin for the decoder's filter (default 32)")
    return p


def _export(a):
    from .nwb import export_nwb

    subject = {"subject_id": a.subject_id, "species": a.species, "sex": a.sex, "age": a.age,
               "date_of_birth": a.date_of_birth, "strain": a.strain, "genotype": a.genotype, "weight": a.weight,
               "description": a.subject_description}
    meta = {"description": a.description, "experimenter": a.experimenter, "institution": a.institution,
            "session_id": a.session_id}
    info = export_nwb(a.session, a.out, subject=subject, metadata=meta)
    if not info["status"].endswith("ended cleanly"):
        print(f"note: {info['status']}", file=sys.stderr)
    print(f"wrote {info['path']}: {info['bins']} bins, {info['published']} published, {info['events']} events")
    return 0


def _convert(a):
    from .nwb_to_npz import convert

    arrays = convert(a.input, a.out, a.bin_ms, units=a.units, behavior=a.behavior, start=a.start, stop=a.stop)
    keys = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if k in ("spikes", "behavior", "trial_starts"))
    print(f"wrote {a.out}: {keys}, dt {float(arrays['dt'])}")
    return 0


def _import_xfads(a):
    from .xfads_import import import_xfads

    res = import_xfads(a.checkpoint, a.out, dt=a.dt, rmsnorm=None if a.rmsnorm is None else a.rmsnorm == "true",
                       likelihood=a.likelihood, samples=a.samples, prefix=a.prefix)
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    print(f"wrote {a.out}: {res.summary}")
    return 0


def _pct(x, q):
    return float(np.percentile(x, q)) if len(x) else None


def summary(s):
    """A session summary as a dict (session-info prints it)."""
    from .session import DECISION_NAMES

    h = s.header
    dec = s["decision"]
    recv, pub = s["recv_ns"], s["publish_ns"]
    published = pub > 0
    lat_us = (pub[published].astype(np.int64) - recv[published].astype(np.int64)) / 1e3
    kinds = {}
    for e in s.events:
        k = e.get("kind") if isinstance(e, dict) else None
        kinds[str(k)] = kinds.get(str(k), 0) + 1
    return {
        "path": s.path, "status": s.status(), "clean": s.clean, "damage": s.damage,
        "format_version": h.get("version"), "latentloop_version": h.get("latentloop_version"),
        "git_commit": h.get("git_commit"), "created": h.get("created"), "config_path": h.get("config_path"),
        "source": h.get("source"), "bin_ms": h.get("bin_ms"), "channels": h.get("channels"),
        "behavior_dims": h.get("behavior_dims"), "description": h.get("description"),
        "subject": h.get("subject"), "metadata": h.get("metadata"), "decoder": h.get("decoder"),
        "models": [{k: e.get(k) for k in ("change", "file", "sha256", "describe", "origin")} for e in s.decoders],
        "bins": s.n_bins, "chunk_shapes": sorted({str(list(x)) for x in s.shapes}),
        "decisions": {DECISION_NAMES.get(int(c), str(int(c))): int((dec == c).sum()) for c in np.unique(dec)},
        "published": int(published.sum()),
        "seconds": float((int(recv.max()) - int(recv.min())) / 1e9) if len(recv) else 0.0,
        "receive_to_publish_us": {"p50": _pct(lat_us, 50), "p99": _pct(lat_us, 99),
                                  "max": float(lat_us.max()) if len(lat_us) else None},
        "events": kinds, "end": s.end,
    }


def _info(a):
    from .session import read_session

    d = summary(read_session(a.session))
    if a.json:
        print(json.dumps(d, indent=2))
        return 0
    lat = d["receive_to_publish_us"]
    fmt = (lambda v: "-" if v is None else f"{v:.1f}")
    lines = [
        f"session   {d['path']}",
        f"status    {d['status']}",
        f"recorded  {d['created']} by latentloop {d['latentloop_version']} (git {d['git_commit']}), "
        f"format {d['format_version']}",
        f"config    {d['config_path']}",
        f"source    {d['source']}: {d['channels']} channels, {d['bin_ms']} ms bins, {d['behavior_dims']} behaviour dims",
        f"about     {d['description']}",
        f"subject   {json.dumps(d['subject']) if d['subject'] else '-'}",
    ]
    for m in d["models"] or [{"change": "-", "file": "-", "sha256": "-", "describe": "no decoder defined"}]:
        lines.append(f"model     {m['change']}: {m['file']} {m['describe']} (sha256 {m['sha256']})")
    lines += [
        f"bins      {d['bins']} over {d['seconds']:.3f} s: "
        + ", ".join(f"{k} {v}" for k, v in d["decisions"].items()) + f"; {d['published']} published",
        f"latency   receive->publish p50 {fmt(lat['p50'])} us, p99 {fmt(lat['p99'])} us, max {fmt(lat['max'])} us",
        "events    " + (", ".join(f"{k} {v}" for k, v in sorted(d["events"].items())) or "none"),
    ]
    print("\n".join(lines))
    return 0


def _say_error(msg):
    print("error: " + " ".join(str(msg).split()), file=sys.stderr)


def main(argv=None):
    a = _parser().parse_args(argv)
    from .session import SessionError

    from .xfads_import import XfadsImportError

    known = [SessionError, XfadsImportError]
    try:
        from .nwb import ExportError
        from .nwb_to_npz import ConvertError
        known += [ExportError, ConvertError]
    except ImportError:  # pragma: no cover (the modules import pynwb lazily)
        pass
    try:
        return {"export-nwb": _export, "nwb-to-npz": _convert, "session-info": _info,
                "import-xfads": _import_xfads}[a.command](a)
    except tuple(known) as e:
        _say_error(e)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _say_error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        _say_error("interrupted")
    except Exception as e:  # an unexpected failure: still one line, unless debugging
        if os.environ.get("LATENTLOOP_DEBUG"):
            raise
        _say_error(f"{type(e).__name__}: {e} (LATENTLOOP_DEBUG=1 shows where)")
    return EXIT_BAD_INPUT
