"""The LLBN/LLOT codec: round trips, the exact byte layout docs/WIRE.md gives, refusals."""

import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import PYDIR, REPO
from latentloop import wire as w


@pytest.mark.parametrize("dtype", ["u16", "u32", "f32"])
def test_bins_round_trip_in_every_dtype(dtype):
    counts = np.array([0, 3, 65535, 7])
    m = w.encode_bin(2**40 + 1, counts, source_ts=99, flags=w.FLAG_STREAM_START, behavior=[0.5, -2.0], dtype=dtype)
    size = np.dtype(w.DTYPES[dtype][1]).itemsize
    assert len(m) == w.BIN_HEADER + 4 * size + 8
    b = w.decode_bin(m)
    assert (b["seq"], b["source_ts"], b["flags"], b["dtype"]) == (2**40 + 1, 99, w.FLAG_STREAM_START, dtype)
    assert b["counts"].tolist() == counts.tolist() and b["behavior"].tolist() == [0.5, -2.0]


def test_bin_header_is_the_documented_layout():
    m = w.encode_bin(5, [1, 2], source_ts=6, flags=w.FLAG_NO_DATA, dtype="u16")
    assert struct.unpack_from("<4sHHIHHQQ", m) == (b"LLBN", 1, 0, 2, w.FLAG_NO_DATA, 0, 5, 6)
    assert m[32:] == b"\x01\x00\x02\x00"


def test_outputs_round_trip_and_empty_arrays():
    o = w.encode_output(9, [1, 2], [3, 4, 5], [6, 7, 8], flags=w.FLAG_GAP | w.FLAG_RESET, dropped_before=3,
                        source_ts=90, recv_ns=5, publish_ns=77, kl=1.5)
    assert len(o) == w.output_len(2, 3) == 56 + 4 * 8
    d = w.decode_output(o)
    assert (d["seq"], d["flags"], d["dropped_before"], d["source_ts"], d["recv_ns"], d["publish_ns"], d["kl"]) == \
        (9, w.FLAG_GAP | w.FLAG_RESET, 3, 90, 5, 77, 1.5)
    assert d["behavior"].tolist() == [1, 2] and d["latent"].tolist() == [3, 4, 5] and d["lag1"].tolist() == [6, 7, 8]
    e = w.decode_output(w.encode_output(0, [], [], []))
    assert e["behavior"].size == e["latent"].size == e["lag1"].size == 0
    assert w.flag_names(0) == "-" and w.flag_names(w.FLAG_RESTART | 64) == "RESTART|0x40"


def test_bad_messages_are_refused_with_a_reason():
    good = w.encode_bin(1, [1, 2, 3])
    for bad, why in [(good[:10], "shorter than"), (b"XXXX" + good[4:], "bad magic"),
                     (good[:4] + b"\x02\x00" + good[6:], "version 2"), (good + b"\0", "header implies"),
                     (good[:6] + b"\x09\x00" + good[8:], "unknown dtype code 9")]:
        with pytest.raises(w.WireError, match=why):
            w.decode_bin(bad)
    o = w.encode_output(1, [1], [1], [1])
    with pytest.raises(w.WireError, match="header implies"):
        w.decode_output(o[:-4])
    with pytest.raises(ValueError, match="do not fit u16"):
        w.encode_bin(0, [70000])
    with pytest.raises(ValueError, match="do not fit u32"):
        w.encode_bin(0, [1.5], dtype="u32")
    with pytest.raises(ValueError, match="same length"):
        w.encode_output(0, [], [1], [])


def test_the_module_self_tests_and_the_examples_import_it_from_a_checkout(tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentloop.wire"], capture_output=True, text=True,
                       env={"PYTHONPATH": str(PYDIR), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "self-test passed" in r.stdout, r.stderr
    assert not (REPO / "examples" / "python" / "latentloop_wire.py").exists()
    pytest.importorskip("zmq")
    for script in ("send_bins.py", "receive_outputs.py", "latency_probe.py"):
        # No PYTHONPATH, another cwd: the script must find <repo>/python itself.
        r = subprocess.run([sys.executable, str(REPO / "examples" / "python" / script), "--help"],
                           capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, f"{script}: {r.stderr}"
