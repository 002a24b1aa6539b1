#!/usr/bin/env bash
# What a model swap costs the bins around it. The standard mlp model (L=32, N=128, S=64,
# r=8, H=128) decodes 1 ms bins sent over ipc by a pyzmq client (examples/python/latency_probe.py)
# for SECONDS. The control client swaps in a second model of the same shape at 1/3 of the
# run (the state is carried over) and one with other latents at 2/3 (reset). From the
# session: receive -> publish in the 500 bins before and after each swap against the rest of
# the run, and the sequence numbers missed or repeated across the swap.
#
#   scripts/measure-swap.sh [SECONDS]        (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
py="${LATENTLOOP_PYTHON:-.venv/bin/python}"
out="$(realpath -m target/swap)"
rm -rf "$out"; mkdir -p "$out"
cargo build --release -q
ll=target/release/latentloop
for m in a:1 b:2; do
    $ll random-model --dynamics mlp --latents 32 --channels 128 --samples 64 --rank 8 --hidden 128 \
        --encoder-hidden 128 --dt 0.001 --seed "${m#*:}" --out "$out/${m%:*}.safetensors" 2>/dev/null
done
$ll random-model --dynamics mlp --latents 16 --channels 128 --samples 64 --rank 8 --hidden 128 \
    --encoder-hidden 128 --dt 0.001 --seed 3 --out "$out/c.safetensors" 2>/dev/null
cat > "$out/swap.toml" <<TOML
[source]
kind = "zmq"
bin_ms = 1.0
channels = 128
[source.zmq]
endpoint = "ipc://$out/in.sock"
[model]
path = "a.safetensors"
[output]
endpoint = "ipc://$out/out.sock"
[reports]
dir = "reports"
TOML
$ll run "$out/swap.toml" --seconds $((secs + 10)) --quiet &
pid=$!
sleep 1
"$py" examples/python/latency_probe.py --channels 128 --in-endpoint "ipc://$out/in.sock" \
    --out-endpoint "ipc://$out/out.sock" --rate 1000 --seconds "$secs" --warmup 2 --json "$out/probe.json" >/dev/null &
probe=$!
PYTHONPATH=python "$py" - "$out" "$secs" <<'PY'
import sys, time
from latentloop import Control
out, secs = sys.argv[1], float(sys.argv[2])
c = Control.from_reports(f"{out}/reports")
time.sleep(2 + secs / 3)
print("swap to b:", c.load_model(f"{out}/b.safetensors"))
time.sleep(secs / 3)
print("swap to c:", c.load_model(f"{out}/c.safetensors"))
PY
wait "$probe"
kill -INT "$pid"; wait "$pid"
PYTHONPATH=python "$py" - "$out" <<'PY'
import sys
import numpy as np
from latentloop.session import read_session, DECODED
out = sys.argv[1]
s = read_session(f"{out}/reports/session")
dec = s.field("decision") == DECODED
seq = s.field("seq")[dec].astype(np.int64)
rp = (s.field("publish_ns")[dec].astype(np.int64) - s.field("recv_ns")[dec].astype(np.int64)) / 1e3
index = np.flatnonzero(dec)
changes = {e["change"]: e for e in s.events_of("decoder")}
print("| bins | count | receive -> publish p50 / p99 / max us | seq missed / repeated |")
print("|---|---|---|---|")
near = np.zeros(len(rp), bool)
rows = []
for a in s.events_of("applied"):
    ch = a["change"]
    if ch == 0 or ch not in changes:
        continue
    at = np.searchsorted(index, a["record"])
    for name, sl in (("500 before", slice(max(at - 500, 0), at)), ("500 after", slice(at, at + 500))):
        near[sl] = True
        rows.append((f"{name} swap to {changes[ch]['file']}", rp[sl], seq[max(sl.start - 1, 0):sl.stop]))
for name, v, sq in rows:
    d = np.diff(sq)
    print(f"| {name} | {len(v)} | {np.percentile(v, 50):.0f} / {np.percentile(v, 99):.0f} / {v.max():.0f} | "
          f"{int((d[d > 1] - 1).sum())} / {int((d <= 0).sum())} |")
v = rp[~near]
print(f"| the rest of the run | {len(v)} | {np.percentile(v, 50):.0f} / {np.percentile(v, 99):.0f} / {v.max():.0f} | |")
print("\nswaps:", [(changes[e['change']]['file'], e['record']) for e in s.events_of('applied') if e['change'] in changes and e['change']])
PY
