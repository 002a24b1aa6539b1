"""export_nwb: pynwb reads back every value of the session; nwbinspector finds nothing
critical and no best-practice violation; ties and disorder in receive times, nested event
fields and sessions without bins are handled as documented."""

import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import sessionkit as kit
from conftest import run_cli
from latentloop.session import FIXED_FIELDS, read_session

pynwb = pytest.importorskip("pynwb")
nwbinspector = pytest.importorskip("nwbinspector")
from latentloop.nwb import ExportError, export_nwb, read_events  # noqa: E402

BAD = ("CRITICAL", "BEST_PRACTICE_VIOLATION", "PYNWB_VALIDATION", "ERROR")


def serious(path):
    """nwbinspector's messages at CRITICAL or BEST_PRACTICE_VIOLATION (or validation errors)."""
    return [f"{m.importance.name} {m.check_function_name} {m.location}: {m.message}"
            for m in nwbinspector.inspect_nwbfile(nwbfile_path=str(path)) if m.importance.name in BAD]


def ns_to_s(ns, origin):
    return (np.asarray(ns).astype(np.int64) - np.int64(origin)).astype(np.float64) / 1e9


def check_round_trip(s, nwb, info):
    """Every value in the file equals the session's (rows in the documented orders)."""
    f = {n: s[n] for n, _ in FIXED_FIELDS if n != "_reserved"}
    origin = info["origin_ns"]
    recv = np.lexsort((f["index"], f["recv_ns"]))
    ts = nwb.acquisition["binned_counts"]
    assert ts.unit == "count" and ts.resolution == -1.0
    np.testing.assert_array_equal(ts.data[:], s["counts"][recv])
    t = np.asarray(ts.timestamps[:])
    assert (np.diff(t) > 0).all()
    if info["ties"] == 0:
        np.testing.assert_array_equal(t, ns_to_s(f["recv_ns"][recv], origin))
    br = nwb.processing["decoder"]["bin_records"]
    for n in f:
        np.testing.assert_array_equal(br[n].data[:], f[n][recv], err_msg=n)
    pub = np.flatnonzero(f["publish_ns"] > 0)
    pub = pub[np.lexsort((f["index"][pub], f["publish_ns"][pub]))]
    d = nwb.processing["decoder"]
    if len(pub):
        pt = np.asarray(d["kl"].timestamps[:])
        assert (np.diff(pt) > 0).all() and len(pt) == len(pub)
        np.testing.assert_array_equal(d["kl"].data[:], f["kl"][pub])
        np.testing.assert_array_equal(d["decoded_behavior"].data[:], s["behavior_out"][pub])
        np.testing.assert_array_equal(d["filtered_latent"].data[:], s["latent"][pub])
        np.testing.assert_array_equal(d["lag1_latent"].data[:], s["lag1"][pub])
        np.testing.assert_array_equal(d["latency_receive_to_publish"].data[:],
                                      (f["publish_ns"][pub].astype(np.int64) - f["recv_ns"][pub].astype(np.int64)) / 1e9)
        np.testing.assert_array_equal(d["latency_filter"].timestamps[:], pt)
    assert read_events(nwb) == s.events


def test_a_recorded_session_exports_and_reads_back_equal(sim_session, tmp_path):
    path, summary, cfg = sim_session
    s = read_session(path)
    out = tmp_path / "sim.nwb"
    info = export_nwb(s, out)
    assert (info["bins"], info["published"], info["events"]) == (s.n_bins, s.n_bins, len(s.events))
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        check_round_trip(s, nwb, info)
        h = s.header
        assert nwb.session_description == h["description"]
        uuid.UUID(nwb.identifier)
        start = s.created.timestamp() - info["shift_s"]
        assert nwb.session_start_time.timestamp() == start == nwb.timestamps_reference_time.timestamp()
        assert info["origin_ns"] == h["created_monotonic_ns"] - info["shift_s"] * 10**9
        assert tuple(nwb.experimenter) == ("Doe, Jane",) and nwb.institution == "Test Lab"
        assert nwb.session_id == "pytest-1" and nwb.data_collection == h["config_text"] == cfg.read_text()
        sub = nwb.subject
        assert (sub.subject_id, sub.species, sub.sex, sub.age) == ("m1", "Mus musculus", "U", "P90D")
        assert "cage: B2" in sub.description
        sha = h["model"]["sha256"]
        assert sha in nwb.processing["decoder"].description and sha in nwb.notes
        rb = nwb.acquisition["received_behavior"]
        np.testing.assert_array_equal(rb.data[:], s["behavior_in"])
        # The wall clock: session_start_time + t is the record's wall time.
        t0 = nwb.acquisition["binned_counts"].timestamps[0]
        assert abs(start + t0 - s.wall_time(s["recv_ns"][0]).timestamp()) < 1e-5
        kinds = list(nwb.intervals["latentloop_events"]["kind"].data[:])
        assert "stop" in kinds and "decoder" in kinds
    assert serious(out) == []


def test_the_nwbinspector_command_finds_nothing_serious(sim_session, tmp_path):
    out = tmp_path / "cli.nwb"
    r = run_cli("export-nwb", sim_session[0], out)
    assert r.returncode == 0, r.stderr
    assert re.match(r"wrote .*cli\.nwb: \d+ bins, \d+ published, \d+ events", r.stdout)
    exe = Path(sys.executable).with_name("nwbinspector")
    if not exe.exists():
        pytest.skip("no nwbinspector command next to this python")
    r = subprocess.run([str(exe), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for level in BAD:
        assert f"- {level}" not in r.stdout, r.stdout
    assert "Found" in r.stdout or "No issues" in r.stdout, r.stdout


def test_a_killed_session_with_two_shapes_exports_what_was_recovered(killed_session, tmp_path):
    s = read_session(killed_session)
    out = tmp_path / "killed.nwb"
    info = export_nwb(s, out, subject={"subject_id": "sim1", "species": "Mus musculus", "sex": "U", "age": "P1D"},
                      quiet=True)
    # The header's clock anchor is read before anything is recorded (calibration included),
    # so no time is negative and the start is not moved.
    assert info["shift_s"] == 0 and "did not end cleanly" in info["status"]
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        check_round_trip(s, nwb, info)
        assert "did not end cleanly" in nwb.notes
        assert min(nwb.acquisition["binned_counts"].timestamps[:]) >= 0
    assert serious(out) == []


def _disordered(tmp_path):
    """Records out of receive order, with ties; nested event fields with awkward keys."""
    base = 10_000_000_000
    recv = [base + 5, base + 3, base + 3, base + 9, base + 9, base + 9, base + 20, base + 30]
    recs = []
    for i, r in enumerate(recv):
        published = i not in (2, 4)
        recs.append({"index": i, "seq": i, "recv_ns": r, "push_ns": r + 1, "pop_ns": r + 2, "step_ns": r + 3,
                     "publish_ns": (base + 100 + 7 * i - (i == 5) * 14) if published else 0,
                     "decision": 0 if published else 1, "kl": 0.25 * i, "bits": 1, "counts": [i, 2 * i, 7],
                     "behavior_in": [i / 2], "behavior_out": [-i], "latent": [i, 1], "lag1": [1, i]})
    events = [
        {"kind": "start", "record": 0, "t_ns": base - 2_500_000_000, "wall": "2026-01-02T03:04:02Z"},
        {"kind": "decoder", "record": 0, "change": 0, "file": "model-0.safetensors", "sha256": "ab" * 32},
        {"kind": "control", "record": 3, "t_ns": base + 8, "request": {"cmd": "event", "label": "go",
         "payload": {"a.b": [1, {"c/d": None}], "": {}, "x:y": [[{"z": True}]], "_p": "%2E"}},
         "reply": {"ok": True, "change": 1}},
        {"kind": "restart", "seq": 6, "record": 6},
        {"kind": "stop", "record": 8, "t_ns": base + 40, "reason": "a {brace: like} this", "order": ["x{y:z}"],
         "_x": 1},
    ]
    chunks = [kit.frame(1, kit.bins_payload(recs[:5])), kit.frame(2, kit.events_payload(events[:3])),
              kit.frame(1, kit.bins_payload(recs[5:])), kit.frame(2, kit.events_payload(events[3:])),
              kit.frame(3, b'{"kind": "end", "counters": {}}')]
    hdr = kit.header(subject={"subject_id": "s1", "species": "Homo sapiens", "sex": "O", "age": "P30Y"},
                     metadata={"experimenter": ["Doe, Jane", "Roe, Rich"], "institution": "Lab"})
    return kit.write(tmp_path / "disordered", chunks, hdr)


def test_disordered_and_tied_times_ascend_strictly_and_nested_events_come_back(tmp_path):
    s = read_session(_disordered(tmp_path))
    out = tmp_path / "d.nwb"
    info = export_nwb(s, out, quiet=True)
    assert info["ties"] == 1 + 2 + 1 and info["shift_s"] == 3  # the start event is 2.5 s before created
    with pynwb.NWBHDF5IO(str(out), "r") as io:
        nwb = io.read()
        check_round_trip(s, nwb, info)
        t = nwb.acquisition["binned_counts"].timestamps[:]
        ns = np.round((t - t[0]) * 1e9).astype(int)
        assert ns.tolist() == [0, 1, 2, 6, 7, 8, 17, 27]  # 3,3,5,9,9,9,20,30 with ties 1 ns apart
        assert nwb.processing["decoder"]["bin_records"]["index"].data[:].tolist() == [1, 2, 0, 3, 4, 5, 6, 7]
        ev = nwb.intervals["latentloop_events"]
        start = ev["start_time"].data[:]
        assert (np.diff(start) >= 0).all() and (ev["stop_time"].data[:] > start).all()
        # The decoder event has no t_ns: it takes the start event's time (it came after it).
        assert start[0] == start[1] == 0.5 and ev["kind"].data[1] == "decoder"
        assert tuple(nwb.experimenter) == ("Doe, Jane", "Roe, Rich")
    assert serious(out) == []


def test_a_session_without_bins_is_refused(tmp_path):
    d = kit.write(tmp_path / "empty", [kit.frame(2, kit.events_payload([{"kind": "start", "record": 0}]))])
    with pytest.raises(ExportError, match="holds no bin records, nothing to export"):
        export_nwb(d, tmp_path / "x.nwb")
    r = run_cli("export-nwb", d, tmp_path / "x.nwb")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no bin records" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.nwb").exists()


def test_subject_overrides_and_what_the_inspector_would_flag(sim_session, tmp_path):
    s = read_session(sim_session[0])
    info = export_nwb(s, tmp_path / "o.nwb", subject={"sex": "male", "subject_id": "m2"}, quiet=True)
    assert any("not one of M, F, O, U" in n for n in info["notes"])
    with pynwb.NWBHDF5IO(str(tmp_path / "o.nwb"), "r") as io:
        sub = io.read().subject
        assert (sub.subject_id, sub.sex, sub.species) == ("m2", "male", "Mus musculus")
    with pytest.raises(ExportError, match="contains '/'"):
        export_nwb(s, tmp_path / "p.nwb", subject={"subject_id": "a/b"})
