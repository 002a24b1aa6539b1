"""The control client against a running latentloop: every command's reply, a refusal as
ControlError with latentloop's reason, and the requests in the recorded session."""

import json
import subprocess
import time

import pytest

from conftest import rig_config

zmq = pytest.importorskip("zmq")
from latentloop import Control, ControlError, read_session  # noqa: E402


def test_the_client_steers_a_running_decoder(latentloop_bin, tmp_path):
    cfg = rig_config(tmp_path)
    p = subprocess.Popen([str(latentloop_bin), "run", str(cfg), "--seconds", "6", "--quiet"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        reports = tmp_path / "reports"
        deadline = time.monotonic() + 20
        while not (reports / "control.endpoint").exists():
            assert time.monotonic() < deadline and p.poll() is None, "no control.endpoint"
            time.sleep(0.05)
        time.sleep(0.1)
        with Control.from_reports(str(reports)) as c:
            st = c.status()
            assert st["ok"] and st["model"]["describe"].startswith("xfads: node")
            assert c.pause()["after_seq"] is not None
            ev = c.event("trial_start", {"target": [0.5, -0.2]})
            assert ev["change"] > 0
            assert c.resume()["ok"]
            m = c.mask([3, 17])
            assert (m["state"], m["masked"]) == ("carried", [3, 17])
            with pytest.raises(ControlError, match="channel 50 is out of range"):
                c.mask([50])
            bad = c.request({"cmd": "warp"})
            assert bad["ok"] is False and "unknown variant `warp`" in bad["error"]
            assert c.mask([])["masked"] == []
            assert c.stop()["stopping"] is True
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode()
    finally:
        if p.poll() is None:
            p.kill()
    summary = json.loads((reports / "summary.json").read_text())
    s = read_session(summary["session"])
    control = [e for e in s.events if e["kind"] == "control"]
    assert [e["request"]["cmd"] for e in control] == ["status", "pause", "event", "resume", "mask", "mask", "warp",
                                                        "mask", "stop"]
    assert control[6]["reply"]["ok"] is False
    # The replay of the steered session is identical.
    r = subprocess.run([str(latentloop_bin), "replay", summary["session"], "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and "all identical" in r.stderr, r.stderr
