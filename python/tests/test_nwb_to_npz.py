"""nwb-to-npz on NWB files built here in the layouts of the public sets (NLB MC_Maze:
units with obs_intervals and electrodes, behaviour as TimeSeries and Position/SpatialSeries,
trials; FALCON: units, behaviour TimeSeries at a rate): the counts are exactly the spikes
planted per bin, behaviour is resampled as documented, latentloop itself reads the file."""

import datetime as dt
import subprocess

import numpy as np
import pytest

from conftest import binary_path, run_cli

pynwb = pytest.importorskip("pynwb")
from pynwb import NWBHDF5IO, NWBFile, TimeSeries  # noqa: E402
from pynwb.behavior import Position, SpatialSeries  # noqa: E402
from latentloop.nwb_to_npz import ConvertError, bin_nwbfile, convert  # noqa: E402

DT = 0.02
T0 = 100.0


def _plant(rng, bins, units, t0=T0):
    """Poisson counts per bin and spike times inside their bins (away from the edges)."""
    counts = rng.poisson(0.8, (bins, units))
    counts[-1, 0] = max(counts[-1, 0], 1)  # a spike in the last bin, so the default stop keeps it
    trains = []
    for j in range(units):
        k = np.repeat(np.arange(bins), counts[:, j])
        trains.append(np.sort(t0 + (k + rng.uniform(0.05, 0.95, len(k))) * DT))
    return counts, trains


def _file():
    return NWBFile(session_description="test", identifier="test",
                   session_start_time=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc))


def maze_like(path, rng):
    """MC_Maze's layout: 150 bins of planted spikes, trials at 0, 1, 2 s, hand_vel at 1 kHz
    as a TimeSeries, cursor_pos at 10 Hz in Position."""
    nwb = _file()
    dev = nwb.create_device(name="array")
    grp = nwb.create_electrode_group(name="M1", description="Utah array", location="M1", device=dev)
    for _ in range(4):
        nwb.add_electrode(group=grp, location="M1")
    counts, trains = _plant(rng, 150, 6)
    for j, tr in enumerate(trains):
        early = T0 - 0.5 - 0.01 * j if j % 2 else None  # spikes before the first trial: not binned
        st = np.concatenate([[early], tr]) if early is not None else tr
        nwb.add_unit(spike_times=st, obs_intervals=[[T0 - 1, T0 + 4]], electrodes=[j % 4])
    for k in range(3):
        nwb.add_trial(start_time=T0 + k, stop_time=T0 + k + 0.9)
    beh = nwb.create_processing_module(name="behavior", description="behaviour")
    t_vel = T0 + (np.arange(150 * 20) + 0.5) / 1000.0
    vel = np.stack([np.sin(t_vel), np.cos(3 * t_vel)], 1)
    beh.add(TimeSeries(name="hand_vel", data=vel, unit="mm/s", timestamps=t_vel, description="hand velocity"))
    t_pos = T0 + 0.1 * np.arange(31) + 0.003
    pos = Position(name="Position")
    pos.add_spatial_series(SpatialSeries(name="cursor_pos", data=np.stack([2 * t_pos + 1, -t_pos], 1),
                                         timestamps=t_pos, reference_frame="screen centre", unit="meters",
                                         description="cursor"))
    beh.add(pos)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return counts, vel, t_pos


def falcon_like(path, rng):
    """FALCON's layout: units, behaviour TimeSeries at 100 Hz (starting_time + rate), a
    boolean eval mask beside it, no trials."""
    nwb = _file()
    counts, trains = _plant(rng, 80, 5, t0=T0)
    for tr in trains:
        nwb.add_unit(spike_times=tr)
    beh = nwb.create_processing_module(name="behavior", description="behaviour")
    emg = rng.normal(size=(160, 3))
    beh.add(TimeSeries(name="preprocessed_emg", data=emg, unit="a.u.", starting_time=T0 + 0.005, rate=100.0,
                       description="EMG"))
    beh.add(TimeSeries(name="eval_mask", data=np.ones(160, bool), unit="n/a", starting_time=T0 + 0.005, rate=100.0,
                       description="mask"))
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return counts, emg


def _read(path, **kw):
    said = []
    with NWBHDF5IO(str(path), "r") as io:
        out = bin_nwbfile(io.read(), 20, say=said.append, **kw)
    return out, said


def test_an_nlb_maze_layout_bins_to_the_planted_counts(tmp_path):
    rng = np.random.default_rng(1)
    counts, vel, t_pos = maze_like(tmp_path / "maze.nwb", rng)
    out, said = _read(tmp_path / "maze.nwb", behavior="hand_vel")
    np.testing.assert_array_equal(out["spikes"], counts)
    assert out["spikes"].dtype == np.int32 and out["dt"] == DT and out["t_start"] == T0
    assert out["trial_starts"].tolist() == [0, 50, 100] and out["trial_starts"].dtype == np.int64
    assert any("3 spikes outside the bins" in m for m in said), said
    np.testing.assert_allclose(out["behavior"], vel.reshape(150, 20, 2).mean(1), rtol=1e-6)
    assert out["behavior"].dtype == np.float32
    assert any(m.startswith("behavior: processing/behavior/hand_vel (2 dims, 3000 samples; mean") for m in said)
    # cursor_pos at 10 Hz: bins holding a sample take it, the others interpolate at their centre.
    for name in ("Position/cursor_pos", "cursor_pos"):
        out, said = _read(tmp_path / "maze.nwb", behavior=name)
        centres = T0 + (np.arange(150) + 0.5) * DT
        k_with = ((t_pos - T0) / DT).astype(int)
        want = np.stack([2 * centres + 1, -centres], 1)
        ok = k_with < 150
        want[k_with[ok]] = np.stack([2 * t_pos + 1, -t_pos], 1)[ok]
        np.testing.assert_allclose(out["behavior"], want, rtol=1e-6)
        assert any("linear interpolation at the bin centre for 120 bins" in m for m in said), said
    out, said = _read(tmp_path / "maze.nwb")
    assert any(m.startswith("behavior: processing/behavior/") and "also there:" in m for m in said), said


def test_a_falcon_layout_with_a_rate_and_explicit_bins(tmp_path):
    rng = np.random.default_rng(2)
    counts, emg = falcon_like(tmp_path / "falcon.nwb", rng)
    out, said = _read(tmp_path / "falcon.nwb")
    with NWBHDF5IO(str(tmp_path / "falcon.nwb"), "r") as io:
        first = min(io.read().units["spike_times"].target.data[:])
    assert out["t_start"] == first  # no trials: bin 0 starts at the first spike
    out, said = _read(tmp_path / "falcon.nwb", start=T0)
    np.testing.assert_array_equal(out["spikes"], counts)
    assert "trial_starts" not in out
    assert any("processing/behavior/preprocessed_emg (3 dims" in m for m in said), said  # not the bool mask
    np.testing.assert_allclose(out["behavior"], emg.reshape(80, 2, 3).mean(1), rtol=1e-6)
    # Whole bins of [start, stop) only.
    out, _ = _read(tmp_path / "falcon.nwb", start=T0 + 10 * DT, stop=T0 + 30.5 * DT)
    np.testing.assert_array_equal(out["spikes"], counts[10:30])


def test_the_command_writes_an_npz_latentloop_reads(tmp_path):
    rng = np.random.default_rng(3)
    counts, vel, _ = maze_like(tmp_path / "maze.nwb", rng)
    r = run_cli("nwb-to-npz", tmp_path / "maze.nwb", "--bin-ms", "20", tmp_path / "maze.npz", "--behavior",
                "hand_vel")
    assert r.returncode == 0, r.stderr
    assert "behavior: processing/behavior/hand_vel" in r.stderr and "wrote" in r.stdout
    z = np.load(tmp_path / "maze.npz")
    assert set(z.files) == {"spikes", "behavior", "dt", "trial_starts", "t_start", "unit_ids"}
    np.testing.assert_array_equal(z["spikes"], counts)
    assert z["dt"].shape == () and z["dt"].dtype == np.float64
    exe = binary_path()
    if exe is not None and exe.exists():
        r = subprocess.run([str(exe), "fit", "kalman", "--data", str(tmp_path / "maze.npz"), "--out",
                            str(tmp_path / "k.safetensors")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr


def test_what_cannot_be_converted_is_said_in_one_line(tmp_path):
    nwb = _file()
    with NWBHDF5IO(str(tmp_path / "nounits.nwb"), "w") as io:
        io.write(nwb)
    with pytest.raises(ConvertError, match="has no Units table"):
        convert(tmp_path / "nounits.nwb", tmp_path / "x.npz", 20)
    falcon_like(tmp_path / "f.nwb", np.random.default_rng(4))
    with pytest.raises(ConvertError, match="no behaviour series 'hand_vel' in processing/behavior; it has: "):
        convert(tmp_path / "f.nwb", tmp_path / "x.npz", 20, behavior="hand_vel")
    with pytest.raises(ConvertError, match="no units table 'sorted'; the file has: units"):
        convert(tmp_path / "f.nwb", tmp_path / "x.npz", 20, units="sorted")
    with pytest.raises(ConvertError, match="positive number"):
        convert(tmp_path / "f.nwb", tmp_path / "x.npz", -1)
    (tmp_path / "junk.nwb").write_bytes(b"not hdf5 at all")
    for args in (["junk.nwb"], ["missing.nwb"]):
        r = run_cli("nwb-to-npz", *args, "--bin-ms", "20", "x.npz", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.npz").exists()
