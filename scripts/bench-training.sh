#!/usr/bin/env bash
# Reproduces the training benchmark table of the README: for each system, a 30,000-bin
# training session and a 10,000-bin held-out test session (same system, another trial
# seed), the Kalman decoder and the XFADS model (node and gru dynamics at L=3, local
# gradients; node also with BPTT on Lorenz), scored by `latentloop eval` on the test file.
#
#   scripts/bench-training.sh [OUT_DIR] [SYSTEMS...]      (default: target/bench-training, all)
#
# Prints a markdown table and leaves every model, report and eval JSON in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-training}"
shift || true
if [ $# -gt 0 ]; then systems=("$@"); else systems=(lorenz arneodo rossler); fi
cargo build --release -q
ll=target/release/latentloop
mkdir -p "$out"
runs=()
for sys in "${systems[@]}"; do
    [ -f "$out/$sys-train.npz" ] || $ll simulate --system "$sys" --neurons 50 --bins 30000 --seed 1 --trial-seed 1 --out "$out/$sys-train.npz"
    [ -f "$out/$sys-test.npz" ] || $ll simulate --system "$sys" --neurons 50 --bins 10000 --seed 1 --trial-seed 2 --out "$out/$sys-test.npz"
    $ll fit kalman --data "$out/$sys-train.npz" --out "$out/$sys-kalman.safetensors" 2>/dev/null
    $ll eval --model "$out/$sys-kalman.safetensors" --data "$out/$sys-test.npz" > "$out/$sys-kalman.eval.json"
    runs+=("$sys kalman -")
    configs=("node local" "gru local")
    [ "$sys" = lorenz ] && configs+=("node bptt")
    for c in "${configs[@]}"; do
        read -r dyn grad <<< "$c"
        name="$sys-$dyn-$grad"
        $ll fit xfads --data "$out/$sys-train.npz" --out "$out/$name.safetensors" --dynamics "$dyn" --latents 3 \
            --grad "$grad" --lr 1e-3 --epochs 80 --patience 20 --max-seconds 540 --quiet --report "$out/$name.report.json"
        $ll eval --model "$out/$name.safetensors" --data "$out/$sys-test.npz" > "$out/$name.eval.json"
        runs+=("$sys $dyn $grad")
    done
done
python3 - "$out" "${runs[@]}" <<'PY'
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
f = lambda v: "-" if v is None else f"{v:.3f}"
print("| system | decoder | grad | rate R2 | state R2 | lag-1 state R2 | behaviour R2 | bits/spike | train s | epochs | s/epoch |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in runs:
    sys_, dyn, grad = r.split()
    name = f"{sys_}-kalman" if dyn == "kalman" else f"{sys_}-{dyn}-{grad}"
    e = json.load(open(f"{out}/{name}.eval.json"))
    rep = {} if dyn == "kalman" else json.load(open(f"{out}/{name}.report.json"))
    print(f"| {sys_} | {dyn} | {grad} | {f(e['rate_r2'])} | {f(e['state_r2'])} | {f(e['lag1_state_r2'])} | {f(e['behavior_r2'])} | "
          f"{f(e['bits_per_spike'])} | {rep.get('seconds', 0):.0f} | {rep.get('epochs_run', '-')} | {rep.get('seconds_per_epoch', 0):.2f} |")
PY
