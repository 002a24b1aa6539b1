#!/usr/bin/env bash
# LSL input beside ZeroMQ input, at 1 kHz bins, same model, same machine, one script:
# examples/python/latency_probe.py sends paced bins of 128 counts (a pyzmq XPUB socket, then
# a pylsl outlet with --lsl) and receives latentloop's outputs, reporting send -> receive;
# latentloop's summary.json adds receive -> publish and, for LSL, source -> publish (the
# outlet's own timestamp). Loopback only: liblsl runs with a machine-scope config.
#
#   scripts/measure-lsl.sh [SECONDS]     (default 30; needs .venv with pyzmq, numpy, pylsl)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"
py="${LATENTLOOP_PYTHON:-.venv/bin/python}"
export LATENTLOOP_PYTHON="$py"   # latentloop asks it where pylsl's liblsl is
out=target/latency-lsl
rm -rf "$out"
mkdir -p "$out"
cat > "$out/lsl_api.cfg" <<CFG
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
MachineAddresses = {127.0.0.1}
[lab]
KnownPeers = {127.0.0.1}
[log]
level = -3
CFG
export LSLAPICFG="$PWD/$out/lsl_api.cfg"
cargo build --release -q
ll=target/release/latentloop
$ll random-model --dynamics mlp --latents 32 --channels 128 --samples 64 --rank 8 --hidden 128 \
    --encoder-hidden 128 --dt 0.001 --out "$out/standard.safetensors" 2>/dev/null
common='bin_ms = 1.0
channels = 128'
for input in zmq lsl; do
    if [ "$input" = zmq ]; then
        src=$'kind = "zmq"\n'"$common"$'\n[source.zmq]\nendpoint = "ipc://'"$PWD/$out"$'/in.sock"'
        probe=(--in-endpoint "ipc://$PWD/$out/in.sock")
    else
        src=$'kind = "lsl"\n'"$common"$'\n[source.lsl]\nname = "latentloop-probe"\nshape = "counts"\nresolve_timeout_s = 20.0'
        probe=(--lsl latentloop-probe)
    fi
    cat > "$out/$input.toml" <<TOML
[source]
$src
[model]
path = "standard.safetensors"
[output]
endpoint = "ipc://$PWD/$out/$input-out.sock"
[reports]
dir = "$input-reports"
TOML
    if [ "$input" = lsl ]; then
        # The outlet must exist before latentloop resolves it: the probe first.
        "$py" examples/python/latency_probe.py --channels 128 "${probe[@]}" --out-endpoint "ipc://$PWD/$out/$input-out.sock" \
            --rate 1000 --seconds "$secs" --warmup 2 --json "$out/$input-probe.json" &
        probe_pid=$!
        sleep 2
        $ll run "$out/$input.toml" --seconds $((secs + 20)) --quiet &
        pid=$!
        wait "$probe_pid"
    else
        $ll run "$out/$input.toml" --seconds $((secs + 20)) --quiet &
        pid=$!
        sleep 1
        "$py" examples/python/latency_probe.py --channels 128 "${probe[@]}" --out-endpoint "ipc://$PWD/$out/$input-out.sock" \
            --rate 1000 --seconds "$secs" --warmup 2 --json "$out/$input-probe.json"
    fi
    kill -INT "$pid"
    wait "$pid"
done
"$py" - "$out" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
print("| input | measured by | bins | p50 us | p99 us | p99.9 us | max us | lost |")
print("|---|---|---|---|---|---|---|---|")
for i in ["zmq", "lsl"]:
    p = json.load(open(f"{out}/{i}-probe.json"))
    e = p["latency"]["end_to_end"]
    rows[i] = e
    print(f"| {i} | client, send -> receive | {e['count']} | {e['p50_us']:.0f} | {e['p99_us']:.0f} | {e['p999_us']:.0f} | {e['max_us']:.0f} | {p['lost']} |")
    s = json.load(open(f"{out}/{i}-reports/summary.json"))
    r = next(x for x in s["stages"] if x["stage"] == "receive_to_publish")
    print(f"| {i} | latentloop, receive -> publish | {r['count']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p999_us']:.0f} | {r['max_us']:.0f} | |")
    if s.get("source_to_publish"):
        r = s["source_to_publish"]
        print(f"| {i} | latentloop, LSL timestamp -> publish | {r['count']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p999_us']:.0f} | {r['max_us']:.0f} | |")
z, l = rows["zmq"], rows["lsl"]
print()
print("LSL / zmq, send -> receive: p50 %.2f, p99 %.2f, p99.9 %.2f" % (
    l["p50_us"] / z["p50_us"], l["p99_us"] / z["p99_us"], l["p999_us"] / z["p999_us"]))
PY
