#!/usr/bin/env bash
# Soak: `latentloop run` at 1 kHz with the standard mlp model (L=32, N=128, S=64, r=8,
# H=128), fed by a pyzmq client (examples/python/latency_probe.py) for SECONDS, recording
# on. Every 10 s it samples the process's resident memory and asks the control socket for
# the counters. At the end: bins sent, answered and lost (each loss attributed), RSS after
# warm-up (the control history full, plus a minute) and at the end, latency per window (10 min, or SECONDS/3 for short runs),
# and a replay of the whole session, which must be identical. Exits non-zero if a check fails:
# a loss latentloop did not report, RSS growth over 1 MiB after warm-up, a replay that differs.
#
#   scripts/soak.sh 3600          (an hour; needs .venv with pyzmq, numpy)
#   scripts/soak.sh 30            (what CI runs: the same checks, windows of 10 s)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-3600}"
py="${LATENTLOOP_PYTHON:-.venv/bin/python}"
out="$(realpath -m "${SOAK_DIR:-target/soak}")"
window="${WINDOW:-$(( secs >= 1800 ? 600 : (secs / 3 > 0 ? secs / 3 : 1) ))}"
# The control thread keeps the last history_seconds of bins (for calibrate and adapt):
# ~800 B a bin at 128 channels, so RSS grows until it is full. Warm-up is that, plus a
# minute; short runs keep 5 s of history so that they reach it.
history="${HISTORY:-$(( secs >= 600 ? 120 : 5 ))}"
warm=$(( history + 60 < secs / 2 ? history + 60 : secs / 2 ))
rm -rf "$out"
mkdir -p "$out"
ll="${LATENTLOOP_BIN:-target/release/latentloop}"
if [ -z "${LATENTLOOP_BIN:-}" ]; then cargo build --release -q; fi
"$ll" random-model --dynamics mlp --latents 32 --channels 128 --samples 64 --rank 8 --hidden 128 \
    --encoder-hidden 128 --dt 0.001 --out "$out/standard.safetensors" 2>/dev/null
cat > "$out/soak.toml" <<TOML
[source]
kind = "zmq"
bin_ms = 1.0
channels = 128
[source.zmq]
endpoint = "ipc://$out/in.sock"
[model]
path = "standard.safetensors"
[output]
endpoint = "ipc://$out/out.sock"
[reports]
dir = "reports"
snapshot_seconds = $window
[control]
history_seconds = $history
TOML
"$ll" run "$out/soak.toml" --seconds $((secs + 60)) --quiet 2> "$out/latentloop.stderr" &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true' EXIT
# Memory and counters every 10 s, from outside the process.
"$py" - "$pid" "$out" <<'PY' &
import json, os, sys, time
import zmq
pid, out = int(sys.argv[1]), sys.argv[2]
ep_file = f"{out}/reports/control.endpoint"
while not os.path.exists(ep_file):
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("latentloop ended before its control socket was up")
    time.sleep(0.1)
ctx = zmq.Context()
s = ctx.socket(zmq.REQ)
s.setsockopt(zmq.RCVTIMEO, 5000)
s.setsockopt(zmq.LINGER, 0)
s.connect(open(ep_file).read().strip())
t0 = time.monotonic()
with open(f"{out}/samples.jsonl", "w") as f:
    while True:
        try:
            rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            break
        try:
            s.send_json({"cmd": "status"})
            bins = s.recv_json()["bins"]
        except zmq.ZMQError:
            break
        f.write(json.dumps({"t_s": round(time.monotonic() - t0, 1), "rss_kib": rss, "bins": bins}) + "\n")
        f.flush()
        time.sleep(10)
PY
sampler=$!
sleep 1
"$py" examples/python/latency_probe.py --channels 128 --in-endpoint "ipc://$out/in.sock" \
    --out-endpoint "ipc://$out/out.sock" --rate 1000 --seconds "$secs" --warmup 2 --window "$window" \
    --json "$out/probe.json"
kill -INT "$pid"
wait "$pid"
trap - EXIT
wait "$sampler" || true
"$ll" replay "$out/reports/session" --quiet 2> "$out/replay.stderr" || true
"$py" - "$out" "$secs" "$warm" <<'PY'
import json, sys
out, secs, warm = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
p = json.load(open(f"{out}/probe.json"))
s = json.load(open(f"{out}/reports/summary.json"))
c = s["counters"]
samples = [json.loads(l) for l in open(f"{out}/samples.jsonl")]
replay = open(f"{out}/replay.stderr").read().strip().splitlines()
replay = replay[-1] if replay else "(no output)"
after_warm = [x for x in samples if x["t_s"] >= warm] or samples[-1:]
rss_warm, rss_end = after_warm[0]["rss_kib"], samples[-1]["rss_kib"]
lost = p["lost"]
fails = []
print(f"| soak | {secs:.0f} s at 1 kHz |")
print("|---|---|")
print(f"| bins sent / answered | {p['sent']} / {p['received']} |")
print(f"| lost | {lost}: stale skips {c['skipped']}, ring full {c['dropped_ring_full']}, rejected {c['rejected']}, "
      f"missing {c['missing']}; unexplained {p['lost_unexplained']} |")
print(f"| answered twice | {p['repeated']} |")
print(f"| RSS at {after_warm[0]['t_s']:.0f} s / at the end ({samples[-1]['t_s']:.0f} s) | {rss_warm} KiB / {rss_end} KiB "
      f"({rss_end - rss_warm:+d} KiB) |")
print(f"| session | {s['session_records']} records, {c['records_lost']} lost |")
print(f"| replay | {replay} |")
print()
print("| window | client send -> receive p50 / p99 / p99.9 us | latentloop receive -> publish p50 / p99 / p99.9 us |")
print("|---|---|---|")
for w in p["windows"]:
    e, l = w["end_to_end"], w["latentloop"]
    print(f"| {w['from_s']:.0f}-{w['to_s']:.0f} s | {e['p50_us']:.0f} / {e['p99_us']:.0f} / {e['p999_us']:.0f} "
          f"| {l['p50_us']:.0f} / {l['p99_us']:.0f} / {l['p999_us']:.0f} |")
if p["lost_unexplained"]:
    fails.append(f"{p['lost_unexplained']} bins lost without latentloop reporting them")
if p["repeated"]:
    fails.append(f"{p['repeated']} bins answered twice")
if rss_end - rss_warm > 1024:
    fails.append(f"RSS grew {rss_end - rss_warm} KiB after warm-up")
if "all identical" not in replay:
    fails.append(f"replay: {replay}")
if c["records_lost"]:
    fails.append(f"{c['records_lost']} session records lost")
for f in fails:
    print("FAIL:", f)
sys.exit(1 if fails else 0)
PY
