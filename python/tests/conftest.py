"""Fixtures: the latentloop binary, real sessions it records, hand-built sessions.

The binary is $LATENTLOOP_BIN, else <repo>/target/release/latentloop. Tests that need it
skip (saying why) only when LATENTLOOP_BIN is unset and there is no release build; a
LATENTLOOP_BIN that does not exist is a failure, not a skip, so CI cannot silently test
nothing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PYDIR = HERE.parent
REPO = PYDIR.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(PYDIR))

MODEL = REPO / "rig-configs" / "models" / "lorenz-node.safetensors"


def binary_path():
    env = os.environ.get("LATENTLOOP_BIN")
    if env:
        return Path(env)
    p = REPO / "target" / "release" / "latentloop"
    return p if p.exists() else None


@pytest.fixture(scope="session")
def latentloop_bin():
    p = binary_path()
    if p is None:
        pytest.skip("no latentloop binary: set LATENTLOOP_BIN or build target/release/latentloop")
    assert p.exists() and os.access(p, os.X_OK), f"LATENTLOOP_BIN={p} is not an executable file"
    return p


def rig_config(dir_, bin_ms=20.0, model=True, calibration_s=None, metadata=True):
    """A sim rig config in dir_ (its reports, session and output socket there too)."""
    lines = [
        "[source]", 'kind = "sim"', f"bin_ms = {bin_ms}", "channels = 50",
        "[source.sim]", 'system = "lorenz"', "seed = 1", "trial_seed = 7", "behavior_dims = 2",
    ]
    if model:
        lines += ["[model]", f"path = {json.dumps(str(MODEL))}", "seed = 1"]
    if calibration_s is not None:
        lines += ["[calibration]", f"seconds = {calibration_s}"]
    lines += ["[output]", f'endpoint = "ipc://{dir_}/out.sock"', "[reports]", f'dir = "{dir_}/reports"']
    if metadata:
        lines += ["[record]", 'description = "python tests: simulated Lorenz rig"', 'experimenter = "Doe, Jane"',
                  'institution = "Test Lab"', 'session_id = "pytest-1"',
                  "[record.subject]", 'subject_id = "m1"', 'species = "Mus musculus"', 'sex = "U"',
                  'age = "P90D"', 'cage = "B2"']
    path = Path(dir_) / "rig.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def sim_session(latentloop_bin, tmp_path_factory):
    """A clean 2 s session of the 20 ms sim rig: (session dir, summary.json, config path)."""
    d = tmp_path_factory.mktemp("sim")
    cfg = rig_config(d)
    r = subprocess.run([str(latentloop_bin), "run", str(cfg), "--seconds", "2", "--quiet"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads((d / "reports" / "summary.json").read_text())
    return Path(summary["session"]), summary, cfg


@pytest.fixture(scope="session")
def killed_session(latentloop_bin, tmp_path_factory):
    """A 1 ms sim rig that calibrates a Kalman decoder for 0.5 s, killed with SIGKILL after
    about 1.5 s: calibration records (no latents) then decoded ones (3 latents)."""
    d = tmp_path_factory.mktemp("killed")
    cfg = rig_config(d, bin_ms=1.0, model=False, calibration_s=0.5, metadata=False)
    p = subprocess.Popen([str(latentloop_bin), "run", str(cfg), "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    session = d / "reports" / "session"
    deadline = time.monotonic() + 20
    # 1.5 s after the recording starts (the binary may take a moment to start).
    while not (session / "records.lls").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.02)
    time.sleep(1.5)
    alive = p.poll() is None
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=10)
    assert alive, f"latentloop exited before the kill: {err.decode(errors='replace')}"
    return session


@pytest.fixture
def sim_copy(sim_session, tmp_path):
    """A copy of the sim session to damage."""
    dst = tmp_path / "session"
    shutil.copytree(sim_session[0], dst)
    return dst


def run_cli(*args, cwd=None, env=None):
    """`python -m latentloop ARGS` with this checkout's package; returns CompletedProcess."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(PYDIR) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("LATENTLOOP_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "latentloop", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=120)
