"""`python -m latentloop`: summaries, and bad input as one `error:` line with status 2;
`pip install ./python` (setuptools, fetched by pip for the build as usual)."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import PYDIR, run_cli


def one_error(r, *says):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for s in says:
        assert s in lines[0], lines[0]


def test_bad_input_is_one_error_line(tmp_path, sim_copy):
    one_error(run_cli("session-info", tmp_path / "nope"), "nope: not a session folder: cannot read session.json")
    (tmp_path / "file").write_text("x")
    one_error(run_cli("session-info", tmp_path / "file"), "not a session folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "session.json").write_text('{"format": "something"}')
    one_error(run_cli("export-nwb", other, tmp_path / "o.nwb"), 'not a latentloop session header (format "something")')
    (other / "session.json").write_text("{not json")
    one_error(run_cli("session-info", other), "not valid JSON")
    h = json.loads((sim_copy / "session.json").read_text())
    (sim_copy / "session.json").write_text(json.dumps(dict(h, version=2)))
    one_error(run_cli("export-nwb", sim_copy, tmp_path / "o.nwb"),
              "session format version 2 is newer than this latentloop reads (1); upgrade latentloop")
    one_error(run_cli("export-nwb"), "the following arguments are required: SESSION, OUT.nwb")
    one_error(run_cli("nwb-to-npz", "a.nwb", "b.npz"), "--bin-ms")
    one_error(run_cli("nwb-to-npz", "a.nwb", "b.npz", "--bin-ms", "fast"), "invalid float value")
    one_error(run_cli(), "COMMAND")


def test_session_info_summarises_and_names_damage(sim_session, sim_copy):
    r = run_cli("session-info", sim_session[0])
    assert r.returncode == 0, r.stderr
    n = sim_session[1]["counters"]["decoded"]
    assert f"status    {n} bins; the session ended cleanly" in r.stdout
    assert "model     0: model-0.safetensors xfads" in r.stdout and f"decoded {n}" in r.stdout
    d = json.loads(run_cli("session-info", "--json", sim_session[0]).stdout)
    assert d["bins"] == n and d["clean"] and d["decisions"] == {"decoded": n} and d["subject"]["subject_id"] == "m1"
    rec = sim_copy / "records.lls"
    rec.write_bytes(rec.read_bytes()[:-7])
    r = run_cli("session-info", sim_copy)
    assert r.returncode == 0 and "did not end cleanly: chunk " in r.stdout and "cut off" in r.stdout, r.stdout


def test_every_command_has_help():
    for args in ([], ["export-nwb"], ["nwb-to-npz"], ["session-info"]):
        r = run_cli(*args, "--help")
        assert r.returncode == 0 and "usage: python -m latentloop" in r.stdout, r.stderr
    assert "--subject-id" in run_cli("export-nwb", "--help").stdout


def test_pip_installs_the_package(tmp_path):
    target, wheels = tmp_path / "site", tmp_path / "wheels"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    pip = [sys.executable, "-m", "pip"]
    if subprocess.run(pip + ["--version"], capture_output=True).returncode:
        pytest.skip("no pip in this python")
    r = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(PYDIR)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(pip + ["wheel", "--no-deps", "-w", str(wheels), str(PYDIR)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = wheels.glob("latentloop-0.1.0-py3-none-any.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for m in ("__init__", "__main__", "cli", "wire", "session", "nwb", "nwb_to_npz"):
        assert f"latentloop/{m}.py" in names
    meta = zipfile.ZipFile(whl).read("latentloop-0.1.0.dist-info/METADATA").decode()
    assert "Requires-Dist: numpy" in meta and 'extra == "nwb"' in meta and "Requires-Python: >=3.9" in meta
    # The installed copy runs from anywhere, without this checkout on the path.
    r = subprocess.run([sys.executable, "-c", "import latentloop, sys; print(latentloop.__file__); "
                        "sys.argv = ['latentloop', '--version']; import runpy; runpy.run_module('latentloop', "
                        "run_name='__main__')"], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(env, PYTHONPATH=str(target)))
    assert r.returncode == 0 and r.stdout.startswith(str(target)) and "latentloop (Python) 0.1.0" in r.stdout, \
        r.stdout + r.stderr
