"""read_session against sessions the binary recorded (clean, killed) and damaged copies:
the counts and what was decided agree with the run's summary, damage is named by chunk
and byte as the Rust reader names it, newer formats are refused by name."""

import datetime as dt
import hashlib
import json

import numpy as np
import pytest

import sessionkit as kit
from conftest import MODEL
from latentloop.session import (CALIBRATION, DECODED, SessionError, parse_rfc3339, read_session)


def test_a_clean_run_reads_back_as_the_run_reported(sim_session):
    path, summary, cfg = sim_session
    s = read_session(path)
    assert s.clean and not s.aborted and s.damage is None
    assert s.n_bins == summary["counters"]["decoded"] == summary["session_records"] > 50
    assert s.status() == f"{s.n_bins} bins; the session ended cleanly"
    b = s.bins
    assert (b["decision"] == DECODED).all() and (b["index"] == np.arange(len(b))).all()
    assert (np.diff(b["seq"].astype(np.int64)) == 1).all() and (np.diff(b["recv_ns"].astype(np.int64)) > 0).all()
    for name in ("behavior_out", "latent", "lag1", "kl", "counts"):
        assert np.isfinite(b[name]).all(), name
    assert b["counts"].shape == (len(b), 50) and b["latent"].shape == (len(b), 3)
    assert (b["recv_ns"] <= b["pop_ns"]).all() and (b["pop_ns"] <= b["step_ns"]).all()
    assert (b["step_ns"] <= b["publish_ns"]).all()
    h = s.header
    assert (h["format"], h["version"], h["source"], h["bin_ms"], h["channels"], h["behavior_dims"]) == \
        ("latentloop-session", 1, "sim", 20.0, 50, 2)
    assert h["config_text"] == cfg.read_text()
    assert h["description"] == "python tests: simulated Lorenz rig"
    assert h["subject"] == {"subject_id": "m1", "species": "Mus musculus", "sex": "U", "age": "P90D", "cage": "B2"}
    assert h["metadata"] == {"experimenter": "Doe, Jane", "institution": "Test Lab", "session_id": "pytest-1"}
    sha = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert h["model"]["sha256"] == sha == hashlib.sha256(open(s.path_of("model-0.safetensors"), "rb").read()).hexdigest()
    assert [e["sha256"] for e in s.decoders] == [sha]
    assert s.end["counters"] == summary["counters"]
    assert {"start", "decoder", "applied", "stop"} <= {e["kind"] for e in s.events}
    # The wall clock of a record is near the header's creation (whole seconds there).
    assert abs((s.wall_time(b["recv_ns"][0]) - s.created).total_seconds()) < 5
    assert s.seconds(h["created_monotonic_ns"]) == 0.0


def test_after_kill_9_the_bins_up_to_the_last_chunk_are_read_across_shapes(killed_session):
    s = read_session(killed_session)
    assert not s.clean and s.end is None
    st = s.status()
    assert st.startswith(f"recovered {s.n_bins} bins; the session did not end cleanly"), st
    assert s.n_bins > 500
    shapes = set(s.shapes)
    assert (50, 2, 0) in shapes and (50, 2, 3) in shapes, shapes
    with pytest.raises(SessionError, match="different shapes"):
        s.bins
    dec, lat = s["decision"], s["latent"]
    assert lat.shape == (s.n_bins, 3) and s["counts"].shape == (s.n_bins, 50)
    assert (dec[:500] == CALIBRATION).all() and np.isnan(lat[dec == CALIBRATION]).all()
    assert np.isfinite(lat[dec == DECODED]).all() and (dec == DECODED).sum() > 0
    assert (s["index"] == np.arange(s.n_bins)).all()


def _chunks(path):
    b = (path / "records.lls").read_bytes()
    return b, kit.chunk_starts(b)


def _bins_before(b, starts, k):
    """Bin records in the chunks before chunk k (read independently of the reader)."""
    import struct
    import zlib
    n = 0
    for at in starts[:k]:
        if b[at + 4] == 1:
            p = zlib.decompress(b[at + 24:at + 24 + struct.unpack_from("<I", b, at + 8)[0]])
            ch, d, l = struct.unpack_from("<IHH", p)
            n += (len(p) - 8) // (96 + 4 * (ch + 2 * d + 2 * l))
    return n


def test_a_cut_or_flipped_stream_is_read_up_to_the_damage_and_says_where(sim_copy):
    full, starts = _chunks(sim_copy)
    rec = sim_copy / "records.lls"
    k = 3
    assert len(starts) > k + 2
    cases = [
        (full[:starts[k] + 30], f"chunk {k} at byte {starts[k]} of records.lls: cut off ("),
        (full[:starts[k] + 10], f"chunk {k} at byte {starts[k]} of records.lls: cut off inside its header (10 of 24"),
    ]
    flipped = bytearray(full)
    flipped[starts[k] + 24 + 5] ^= 0x40
    cases.append((bytes(flipped), f"chunk {k} at byte {starts[k]} of records.lls: its payload is damaged"))
    flipped = bytearray(full)
    flipped[starts[k] + 9] ^= 1
    cases.append((bytes(flipped), f"chunk {k} at byte {starts[k]} of records.lls: its frame is damaged"))
    for data, says in cases:
        rec.write_bytes(data)
        s = read_session(sim_copy)
        assert s.damage is not None and s.damage.startswith(says), s.damage
        n = _bins_before(full, starts, k)
        assert s.n_bins == n and not s.clean
        assert s.status() == f"recovered {n} bins; the session did not end cleanly: {s.damage}"
    # No end chunk: everything read, not clean.
    rec.write_bytes(full[:starts[-1]])
    s = read_session(sim_copy)
    assert s.damage is None and s.end is None and s.status().endswith("(no end record)")
    rec.write_bytes(full[:9])
    assert read_session(sim_copy).damage == "records.lls is 9 bytes, shorter than its 16-byte header"


def test_newer_formats_and_other_folders_are_refused_by_name(sim_copy, tmp_path):
    rec = sim_copy / "records.lls"
    b = bytearray(rec.read_bytes())
    b[8] = 2
    rec.write_bytes(bytes(b))
    with pytest.raises(SessionError, match=r"session format version 2 is newer than this latentloop reads \(1\); "
                                           "upgrade latentloop"):
        read_session(sim_copy)
    hp = sim_copy / "session.json"
    h = json.loads(hp.read_text())
    hp.write_text(json.dumps(dict(h, version=7)))
    with pytest.raises(SessionError, match="session format version 7 is newer"):
        read_session(sim_copy)
    hp.write_text(json.dumps(dict(h, format="something-else")))
    with pytest.raises(SessionError, match='not a latentloop session header \\(format "something-else"\\)'):
        read_session(sim_copy)
    with pytest.raises(SessionError, match="not a session folder: cannot read session.json"):
        read_session(tmp_path / "nope")
    rec.write_bytes(b"NOTASESSION" + bytes(20))
    hp.write_text(json.dumps(h))
    with pytest.raises(SessionError, match="bad magic"):
        read_session(sim_copy)


def test_hand_built_streams_aborted_end_unknown_chunks_and_raw_payloads(tmp_path):
    recs = [{"index": i, "seq": i, "recv_ns": 10_000_000_000 + i, "counts": [i, 1, 2]} for i in range(4)]
    chunks = [kit.frame(1, kit.bins_payload(recs[:2]), encoding=0), kit.frame(9, b"from the future"),
              kit.frame(1, kit.bins_payload(recs[2:], latents=0)), kit.frame(2, b'{"kind": "x"}\nnot json\n'),
              kit.frame(3, b'{"aborted": true}')]
    s = read_session(kit.write(tmp_path / "a", chunks))
    assert s.aborted and not s.clean and s.damage is None
    assert s.status() == "4 bins; the run was stopped by an error (its recording was closed)"
    assert s["counts"][:, 0].tolist() == [0, 1, 2, 3] and s.events == [{"kind": "x"}]
    assert s.shapes == [(3, 1, 2), (3, 1, 0)] and s["latent"].shape == (4, 2)
    # A bins chunk whose records do not fill it, and one without its shape.
    s = read_session(kit.write(tmp_path / "b", [kit.frame(1, kit.bins_payload(recs) + b"\0")]))
    assert s.damage == "chunk 0 at byte 16 of records.lls: its records do not fill it (damaged)" and s.n_bins == 0
    s = read_session(kit.write(tmp_path / "c", [kit.frame(2, b""), kit.frame(1, b"\1\0")]))
    at = kit.chunk_starts((tmp_path / "c" / "records.lls").read_bytes())[1]
    assert s.damage == f"chunk 1 at byte {at} of records.lls: a bins chunk without its shape"
    s = read_session(kit.write(tmp_path / "d", []))
    assert s.n_bins == 0 and s.bins.shape == (0,) and s["counts"].shape == (0, 3)


def test_times_parse_as_utc():
    assert parse_rfc3339("2026-12-03T12:45:42Z") == dt.datetime(2026, 12, 3, 12, 45, 42, tzinfo=dt.timezone.utc)
    assert parse_rfc3339("2026-12-03T13:45:42.1234567+01:00") == \
        dt.datetime(2026, 12, 3, 12, 45, 42, 123456, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError):
        parse_rfc3339("yesterday")
