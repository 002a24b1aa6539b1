#!/usr/bin/env bash
# Installs NVIDIA's NVRTC (the run-time CUDA compiler, libnvrtc.so.12) from its pinned PyPI
# wheel into DIR, without a CUDA toolkit or a GPU, and prints the LD_LIBRARY_PATH line that
# makes latentloop (cudarc) find it:
#
#   eval "$(scripts/install-nvrtc.sh /tmp/nvrtc)"
#   cargo test --release --test gpu_nvrtc
#
# NVRTC 12.8 emits PTX ISA 8.7, which needs an NVIDIA driver of the CUDA 12.8 generation
# (r570) or newer to load. For an older driver pin an older wheel (e.g. 12.4.127 for r550)
# with NVRTC_VERSION=... ; compiling alone (the gpu_nvrtc test) works with any version.
set -euo pipefail
dir="${1:?usage: scripts/install-nvrtc.sh DIR}"
version="${NVRTC_VERSION:-12.8.93}"
python="${PYTHON:-python3}"
if [ ! -x "$dir/bin/pip" ]; then
    "$python" -m venv "$dir" >&2
fi
"$dir/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc-cu12==$version" >&2
lib="$(find "$dir" -name 'libnvrtc.so.12' -path '*cuda_nvrtc/lib/*' -print -quit)"
if [ -z "$lib" ]; then
    echo "install-nvrtc: libnvrtc.so.12 not found under $dir after installing the wheel" >&2
    exit 1
fi
libdir="$(cd "$(dirname "$lib")" && pwd)"
echo "export LD_LIBRARY_PATH=\"$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
