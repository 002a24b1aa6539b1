#!/usr/bin/env bash
# What shadow decoders cost the driving decoder. The standard mlp model (L=32, N=128, S=64,
# r=8, H=128) drives 1 ms bins sent over ipc by a pyzmq client (examples/python/latency_probe.py);
# rounds alternate no shadows / two shadows (the same model with another seed, and a Kalman
# decoder), so the VM's drift falls on both. Prints the driver's receive -> publish per run and
# each shadow's own receive -> its publish, bins and feed losses.
#
#   scripts/measure-shadows.sh [SECONDS_PER_RUN] [ROUNDS]     (defaults 20 and 2)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-20}"
rounds="${2:-2}"
py="${LATENTLOOP_PYTHON:-.venv/bin/python}"
out=target/shadows
rm -rf "$out"; mkdir -p "$out"
cargo build --release -q
ll=target/release/latentloop
$ll random-model --dynamics mlp --latents 32 --channels 128 --samples 64 --rank 8 --hidden 128 \
    --encoder-hidden 128 --dt 0.001 --out "$out/standard.safetensors" 2>/dev/null
$ll simulate --system lorenz --neurons 128 --bins 20000 --dt 0.001 --seed 1 --out "$out/train.npz" 2>/dev/null
$ll fit kalman --data "$out/train.npz" --out "$out/kalman.safetensors" 2>/dev/null

run() { # name shadows(0|2)
    local name=$1 n=$2 a="ipc://$PWD/$out/$1"
    {
        printf '[source]\nkind = "zmq"\nbin_ms = 1.0\nchannels = 128\n[source.zmq]\nendpoint = "%s-in.sock"\n' "$a"
        printf '[model]\npath = "standard.safetensors"\n[output]\nendpoint = "%s-out.sock"\n' "$a"
        printf '[reports]\ndir = "%s"\n[record]\nenabled = false\n[control]\nenabled = false\n' "$name"
        if [ "$n" -gt 0 ]; then
            printf '[[decoder]]\nname = "seed7"\nmodel = "standard.safetensors"\nseed = 7\noutput = "%s-seed7.sock"\n' "$a"
            printf '[[decoder]]\nname = "kalman"\nmodel = "kalman.safetensors"\noutput = "%s-kalman.sock"\n' "$a"
        fi
    } > "$out/$name.toml"
    $ll run "$out/$name.toml" --seconds $((secs + 10)) --quiet &
    local pid=$!
    sleep 1
    "$py" examples/python/latency_probe.py --channels 128 --in-endpoint "$a-in.sock" --out-endpoint "$a-out.sock" \
        --rate 1000 --seconds "$secs" --warmup 2 --json "$out/$name-probe.json" >/dev/null
    kill -INT "$pid"; wait "$pid"
}

for r in $(seq 1 "$rounds"); do
    run "none-$r" 0
    run "two-$r" 2
done
"$py" - "$out" "$rounds" "$secs" <<'PY'
import json, sys
out, rounds, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def e2e(stages):
    return next(x for x in stages if x["stage"] == "receive_to_publish")
print(f"driver receive -> publish, us ({secs:.0f} s per run at 1 kHz, standard mlp, ipc; rounds alternate):\n")
print("| run | shadows | bins | p50 | p99 | p99.9 |")
print("|---|---|---|---|---|---|")
rows = {0: [], 2: []}
for r in range(1, rounds + 1):
    for name, n in ((f"none-{r}", 0), (f"two-{r}", 2)):
        s = json.load(open(f"{out}/{name}/summary.json"))
        x = e2e(s["stages"])
        rows[n].append(x)
        print(f"| {name} | {n} | {x['count']} | {x['p50_us']:.1f} | {x['p99_us']:.1f} | {x['p999_us']:.1f} |")
med = lambda v: sorted(v)[len(v) // 2]
for q in ("p50_us", "p99_us", "p999_us"):
    a, b = med([x[q] for x in rows[0]]), med([x[q] for x in rows[2]])
    print(f"\n{q[:-3]}: with two shadows / without = {b / a:.2f}", end="")
print("\n\nthe shadows' own receive -> their publish, us (last round):\n")
print("| shadow | bins decoded | feed lost | handoff p50 | filter p50 | receive -> publish p50 | p99 | p99.9 |")
print("|---|---|---|---|---|---|---|---|")
s = json.load(open(f"{out}/two-{rounds}/summary.json"))
for sh in s["shadows"]:
    st = {x["stage"]: x for x in sh["stages"]}
    x = st["receive_to_publish"]
    print(f"| {sh['name']} | {sh['decoded']} | {sh['feed_lost']} | {st['handoff']['p50_us']:.1f} | "
          f"{st['filter']['p50_us']:.1f} | {x['p50_us']:.1f} | {x['p99_us']:.1f} | {x['p999_us']:.1f} |")
PY
