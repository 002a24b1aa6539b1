"""A client of latentloop's control socket (docs/CONTROL.md): one method per command.

    from latentloop import Control
    c = Control.from_reports("reports/sim-lorenz")     # reads <reports>/control.endpoint
    c.status()["bins"]["decoded"]
    c.mask([3, 17]); c.load_model("next.safetensors"); c.adapt("rml", half_life_seconds=60)

Each call sends one JSON request on a ZeroMQ REQ socket and returns the reply (a dict).
A reply with "ok": false raises ControlError with latentloop's reason; `request()` returns
any reply as it is. Needs pyzmq.
"""

import json
import os

__all__ = ["Control", "ControlError"]


class ControlError(RuntimeError):
    """latentloop refused a request; the message is its reason."""

    def __init__(self, reply):
        super().__init__(reply.get("error", "refused"))
        self.reply = reply


class Control:
    def __init__(self, endpoint, timeout=15.0, context=None):
        import zmq  # only needed here

        self._zmq = zmq
        self.endpoint = endpoint
        self._ctx = context or zmq.Context.instance()
        self._timeout_ms = int(timeout * 1000)
        self._sock = None
        self._open()

    @classmethod
    def from_reports(cls, reports_dir, **kw):
        """The run whose reports folder is `reports_dir` (its control.endpoint file)."""
        path = os.path.join(reports_dir, "control.endpoint")
        with open(path) as f:
            return cls(f.read().strip(), **kw)

    def _open(self):
        zmq = self._zmq
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.RCVTIMEO, self._timeout_ms)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def close(self):
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, req):
        """Sends one request (a dict with "cmd") and returns the reply, ok or not. A REQ
        socket that timed out is reopened, so the next request can go."""
        self._sock.send(json.dumps(req).encode())
        try:
            return json.loads(self._sock.recv())
        except self._zmq.Again:
            self.close()
            self._open()
            raise TimeoutError(f"no reply from {self.endpoint} within {self._timeout_ms / 1000} s")

    def _ok(self, req):
        r = self.request(req)
        if not r.get("ok"):
            raise ControlError(r)
        return r

    def status(self):
        return self._ok({"cmd": "status"})

    def pause(self):
        return self._ok({"cmd": "pause"})

    def resume(self):
        return self._ok({"cmd": "resume"})

    def reset(self):
        return self._ok({"cmd": "reset"})

    def stop(self):
        return self._ok({"cmd": "stop"})

    def load_model(self, path, carry_state=True):
        return self._ok({"cmd": "load_model", "path": str(path), "carry_state": carry_state})

    def mask(self, channels):
        return self._ok({"cmd": "mask", "channels": [int(c) for c in channels]})

    def event(self, label, payload=None):
        req = {"cmd": "event", "label": label}
        if payload is not None:
            req["payload"] = payload
        return self._ok(req)

    def calibrate(self, seconds=None, ridge=None):
        req = {"cmd": "calibrate"}
        if seconds is not None:
            req["seconds"] = seconds
        if ridge is not None:
            req["ridge"] = ridge
        return self._ok(req)

    def adapt(self, mode, **options):
        """mode: smoothbatch | rml | readout | off; options: batch_seconds,
        half_life_seconds, intention ("behavior" | "refit"), hold_radius, ridge."""
        return self._ok({"cmd": "adapt", "mode": mode, **options})
