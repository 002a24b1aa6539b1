"""latentloop's Python side: tools around the Rust real-time decoder, numpy only.

- `latentloop.wire`: the LLBN (bins in) and LLOT (decoded bins out) message codec
  (docs/WIRE.md), for publishers and subscribers written in Python.
- `latentloop.session`: `read_session(folder)` reads what `latentloop run` recorded
  (docs/SESSION.md), up to any damage, and says where it stopped.
- `latentloop.nwb`: `export_nwb(session, "out.nwb")`, a session as an NWB 2.x file
  (needs pynwb: `pip install 'latentloop[nwb]'`).
- `latentloop.nwb_to_npz`: an NWB file with a Units table (NLB, FALCON, DANDI) binned into
  the .npz that `latentloop fit` / `eval` read (needs pynwb).
- `latentloop.control`: `Control(endpoint)`, a client of a running decoder's control
  socket (docs/CONTROL.md; needs pyzmq).

Command line: `python -m latentloop --help` (export-nwb, nwb-to-npz, session-info).

Submodules load on first use (PEP 562), so `import latentloop` costs nothing, needs numpy
alone, and `python -m latentloop.wire` runs its self-test without a double import.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "wire": ("latentloop.wire", None),
    "session": ("latentloop.session", None),
    "read_session": ("latentloop.session", "read_session"),
    "Session": ("latentloop.session", "Session"),
    "SessionError": ("latentloop.session", "SessionError"),
    "control": ("latentloop.control", None),
    "Control": ("latentloop.control", "Control"),
    "ControlError": ("latentloop.control", "ControlError"),
}

__all__ = ["wire", "session", "read_session", "Session", "SessionError", "control", "Control", "ControlError",
           "__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'latentloop' has no attribute {name!r}")
    module, attr = _LAZY[name]
    m = importlib.import_module(module)
    return m if attr is None else getattr(m, attr)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
