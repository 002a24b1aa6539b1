#!/usr/bin/env bash
# What recording a session costs the 1 kHz pipeline, and what a session costs on disk and
# to replay. The standard mlp model (L=32, N=128, S=64, r=8, H=128) decodes 1 ms bins sent
# over ipc by a pyzmq client (examples/python/latency_probe.py); rounds alternate
# [record] enabled = false / true, so the VM's drift falls on both. Then: the size of the
# recorded session, `latentloop replay` speed on it and on a Kalman-decoder session of the
# same rig, and the NWB export of the last session.
#
#   scripts/measure-recording.sh [SECONDS_PER_RUN] [ROUNDS]     (defaults 30 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
rounds="${2:-3}"
py="${LATENTLOOP_PYTHON:-.venv/bin/python}"
out=target/recording
rm -rf "$out"; mkdir -p "$out"
cargo build --release -q
ll=target/release/latentloop
$ll random-model --dynamics mlp --latents 32 --channels 128 --samples 64 --rank 8 --hidden 128 \
    --encoder-hidden 128 --dt 0.001 --out "$out/standard.safetensors" 2>/dev/null
$ll simulate --system lorenz --neurons 128 --bins 20000 --dt 0.001 --seed 1 --out "$out/train.npz" 2>/dev/null
$ll fit kalman --data "$out/train.npz" --out "$out/kalman.safetensors" 2>/dev/null

run() { # name model record seconds
    local name=$1 model=$2 record=$3 s=$4
    cat > "$out/$name.toml" <<TOML
[source]
kind = "zmq"
bin_ms = 1.0
channels = 128
[source.zmq]
endpoint = "ipc://$PWD/$out/$name-in.sock"
[model]
path = "$model"
[output]
endpoint = "ipc://$PWD/$out/$name-out.sock"
[reports]
dir = "$name"
[record]
enabled = $record
[control]
enabled = false
TOML
    $ll run "$out/$name.toml" --seconds $((s + 10)) --quiet &
    local pid=$!
    sleep 1
    "$py" examples/python/latency_probe.py --channels 128 --in-endpoint "ipc://$PWD/$out/$name-in.sock" \
        --out-endpoint "ipc://$PWD/$out/$name-out.sock" --rate 1000 --seconds "$s" --warmup 2 \
        --json "$out/$name-probe.json" >/dev/null
    kill -INT "$pid"; wait "$pid"
}

for r in $(seq 1 "$rounds"); do
    run "off-$r" standard.safetensors false "$secs"
    run "on-$r" standard.safetensors true "$secs"
done
run kalman kalman.safetensors true "$secs"

# Replay speed (the binary's own bins/s over the step) on the last standard and the Kalman session.
$ll replay "$out/on-$rounds/session" --json --quiet > "$out/replay-standard.json"
$ll replay "$out/kalman/session" --json --quiet > "$out/replay-kalman.json"
PYTHONPATH=python "$py" -m latentloop export-nwb "$out/on-$rounds/session" "$out/session.nwb" --subject-id sim --species "Mus musculus" \
    --sex U --age P90D > "$out/export.txt" 2>&1 || true
PYTHONPATH=python "$py" - "$out" "$rounds" "$secs" <<'PY'
import json, os, sys
out, rounds, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def stage(name):
    s = json.load(open(f"{out}/{name}/summary.json"))
    return next(x for x in s["stages"] if x["stage"] == "receive_to_publish"), s
print(f"receive -> publish, us ({secs:.0f} s per run at 1 kHz, standard mlp, ipc; rounds alternate):\n")
print("| round | recording | bins | p50 | p99 | p99.9 | records lost |")
print("|---|---|---|---|---|---|---|")
med = {"off": [], "on": []}
for r in range(1, rounds + 1):
    for mode in ("off", "on"):
        st, s = stage(f"{mode}-{r}")
        med[mode].append(st)
        print(f"| {r} | {mode} | {st['count']} | {st['p50_us']:.1f} | {st['p99_us']:.1f} | {st['p999_us']:.1f} | {s['counters']['records_lost']} |")
mid = lambda v: sorted(v)[len(v) // 2]
print()
for q in ("p50_us", "p99_us", "p999_us"):
    off, on = mid([x[q] for x in med["off"]]), mid([x[q] for x in med["on"]])
    print(f"median {q[:-3]}: off {off:.1f} us, on {on:.1f} us, on - off {on - off:+.1f} us")
sess = f"{out}/on-{rounds}/session"
size = sum(os.path.getsize(os.path.join(sess, f)) for f in os.listdir(sess))
rec = os.path.getsize(os.path.join(sess, "records.lls"))
st, s = stage(f"on-{rounds}")
print(f"\nsession of {s['counters']['decoded']} bins ({s['decode_seconds']:.0f} s, 128 channels): "
      f"{size / 1e6:.1f} MB ({rec / 1e6:.1f} MB of records, {rec / max(s['counters']['decoded'], 1):.0f} B a bin); "
      f"60 s at 1 kHz: {60000 * rec / max(s['counters']['decoded'], 1) / 1e6:.1f} MB")
for name in ("standard", "kalman"):
    r = json.load(open(f"{out}/replay-{name}.json"))
    print(f"replay, {name}: {r['compared']} bins, identical={r['first_difference'] is None}, {r['bins_per_second']:.0f} bins/s")
print("\n" + open(f"{out}/export.txt").read().strip())
PY
nwbi=$(dirname "$py")/nwbinspector
if [ -x "$nwbi" ]; then "$nwbi" "$out/session.nwb" | tail -n 8; fi
