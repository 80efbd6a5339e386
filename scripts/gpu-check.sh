#!/usr/bin/env bash
# GPU check of the llama_cpp build, for a session that has an NVIDIA GPU box (not run in CI).
#
#   scripts/gpu-check.sh prepare      # on the controller (has the cache, Python, gguf)
#   scripts/gpu-check.sh run          # on the GPU machine (offline is fine)
#
# `prepare` puts the source tarball (sdist tree + prebuilt web UI, from llamavm.source) and a
# tiny GGUF into .cache/gpu-check/ (git-ignored; carry it to the GPU machine, ~32 MB).
# `run` then, with the same cmake flags as the llama_cpp role's CUDA build:
#   1. checks the toolchain (nvidia-smi, nvcc + cuBLAS, cmake, a C++ compiler) and fails fast,
#      and the gpu role's verification: its card table's plan against nvidia-smi (gpu-role.json);
#   2. configures + compiles llama-server with GGML_CUDA=ON for the GPU's compute capability
#      (9.0 -> sm_90 on an H100; LLAMAVM_CUDA_ARCH overrides), FlashAttention kernels on;
#   3. canary: `llama-server --version` and `--list-devices` must show CUDA0; ldd resolves all;
#   4. serves the tiny model fully offloaded (-ngl 99), samples nvidia-smi every 200 ms while
#      it loads and answers /health, /, and a chat completion; checks the server used CUDA0.
# Results go to $OUT (or .cache/gpu-check-out): summary.json, logs, nvidia-smi.csv.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${LLAMAVM_GPU_CHECK_DATA:-${HERE}/.cache/gpu-check}
OUT=${OUT:-${HERE}/.cache/gpu-check-out}
PORT=${LLAMAVM_GPU_CHECK_PORT:-18095}

log() { printf '[gpu-check %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; summary fail "$*"; exit 1; }
summary() {  # STATUS MESSAGE
    mkdir -p "${OUT}"
    python3 - "$1" "$2" "${OUT}" <<'PY' || printf '{"status": "%s"}\n' "$1" >"${OUT}/summary.json"
import json, os, sys
status, msg, out = sys.argv[1:4]
data = {"status": status, "message": msg}
for name in ("arch", "nvcc", "build_s", "canary_version", "first_health_s", "peak_mem_mib"):
    path = os.path.join(out, name + ".txt")
    if os.path.exists(path):
        data[name] = open(path).read().strip()
json.dump(data, open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
}

prepare() {
    local py="${HERE}/.venv/bin/python"
    [ -x "${py}" ] || py=python3
    mkdir -p "${DATA}"
    local tarball
    tarball=$(cd "${HERE}" && "${py}" -m llamavm.source prepare)
    cp "${tarball}" "${DATA}/llama.cpp.tar.gz"
    (cd "${HERE}" && "${py}" -c "
from pathlib import Path
from llamavm import tinymodel
tinymodel.write(tinymodel.TinySpec(name='gpu-check'), Path('${DATA}/tiny.gguf'))
import json, yaml
cards = yaml.safe_load(Path('ansible/roles/gpu/vars/main.yml').read_text())['__gpu_cards']
Path('${DATA}/gpu-cards.json').write_text(json.dumps(cards))
")
    ls -la "${DATA}"
    log "carry .cache/gpu-check to the GPU machine, then: scripts/gpu-check.sh run"
}

find_nvcc() {
    local c
    for c in "${CUDACXX:-}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)" /usr/bin/nvcc; do
        [ -n "${c}" ] && [ -x "${c}" ] && { echo "${c}"; return 0; }
    done
    return 1
}

run() {
    mkdir -p "${OUT}"
    local work=${LLAMAVM_GPU_CHECK_WORK:-/tmp/llamavm-gpu-check}
    [ -f "${DATA}/llama.cpp.tar.gz" ] || die "no ${DATA}/llama.cpp.tar.gz: run 'prepare' and carry it"

    # 1. Toolchain, fail fast (device time is scarce).
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv \
        | tee "${OUT}/gpu.csv" >&2
    local cap arch nvcc
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
    arch=${LLAMAVM_CUDA_ARCH:-${cap/./}}
    echo "${arch}" >"${OUT}/arch.txt"
    # The gpu role's verification: nvidia-smi answers, and the compute capability the role's
    # card table plans for this card (ansible/roles/gpu/vars/main.yml) is the card's own.
    if [ -f "${DATA}/gpu-cards.json" ]; then
        nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | python3 -c '
import json, re, sys
cards = json.load(open(sys.argv[1]))
rows = []
for line in sys.stdin:
    name, cap = [f.strip() for f in line.rsplit(",", 1)]
    planned = next((c["capability"] for c in cards if re.search(c["match"], name)), "")
    rows.append({"card": name, "nvidia_smi": cap, "planned": planned,
                 "cuda_architectures": planned.replace(".", ""), "matches": planned == cap})
json.dump(rows, open(sys.argv[2], "w"), indent=2)
print("gpu role plan:", json.dumps(rows), file=sys.stderr)
' "${DATA}/gpu-cards.json" "${OUT}/gpu-role.json" || log "gpu role table check failed"
    fi
    nvcc=$(find_nvcc) || die "no nvcc (set CUDACXX)"
    "${nvcc}" --version | tail -2 | tee "${OUT}/nvcc.txt" >&2
    local cuda_root
    cuda_root=$(dirname "$(dirname "$(readlink -f "${nvcc}")")")
    if ! ls "${cuda_root}"/lib64/libcublas.so* "${cuda_root}"/targets/*/lib/libcublas.so* \
        >/dev/null 2>&1 && ! ldconfig -p | grep -q libcublas.so; then
        die "nvcc at ${nvcc} has no cuBLAS next to it (ggml-cuda needs it)"
    fi
    command -v cmake >/dev/null || die "cmake not found"
    command -v c++ >/dev/null || die "no C++ compiler"

    # 2. Build, same flags as the role (tasks/preflight.yml) with GGML_CUDA=ON.
    rm -rf "${work}"
    mkdir -p "${work}/src"
    tar -xzf "${DATA}/llama.cpp.tar.gz" -C "${work}/src" --strip-components=1
    [ -f "${work}/src/tools/ui/dist/index.html" ] || die "tarball has no prebuilt web UI"
    local jobs mem_jobs
    jobs=$(nproc)
    mem_jobs=$(($(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) / 2))
    [ "${mem_jobs}" -lt "${jobs}" ] && jobs=${mem_jobs}
    [ "${jobs}" -lt 1 ] && jobs=1
    local t0=${SECONDS}
    log "configuring for sm_${arch} with ${nvcc}, -j${jobs}"
    cmake -S "${work}/src" -B "${work}/build" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN/../lib;$ORIGIN' \
        -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_UI_GZIP=OFF -DGGML_NATIVE=ON -DGGML_CCACHE=ON \
        -DGGML_CUDA=ON -DGGML_CUDA_FA=ON "-DCMAKE_CUDA_ARCHITECTURES=${arch}" \
        "-DCMAKE_CUDA_COMPILER=${nvcc}" >"${OUT}/configure.log" 2>&1 \
        || { tail -40 "${OUT}/configure.log" >&2; die "cmake configure failed"; }
    cmake --build "${work}/build" --target llama-server -j "${jobs}" >"${OUT}/build.log" 2>&1 \
        || { grep -m 30 -E 'error' "${OUT}/build.log" >&2; die "build failed"; }
    echo $((SECONDS - t0)) >"${OUT}/build_s.txt"
    log "built in $((SECONDS - t0)) s"

    # Install layout of the role: bin/ + lib/ with RPATH $ORIGIN/../lib.
    local inst="${work}/install"
    mkdir -p "${inst}/bin" "${inst}/lib"
    cp "${work}/build/bin/llama-server" "${inst}/bin/"
    find "${work}/build/bin" -maxdepth 1 -name 'lib*.so*' -exec cp -P -t "${inst}/lib" {} +
    ls -la "${inst}/lib" >"${OUT}/libs.txt"

    # 3. Canary.
    "${inst}/bin/llama-server" --version >"${OUT}/canary_version.txt" 2>&1 || die "--version failed"
    ldd "${inst}/bin/llama-server" >"${OUT}/ldd.txt"
    grep -q 'not found' "${OUT}/ldd.txt" && die "unresolved libraries: $(grep 'not found' "${OUT}/ldd.txt")"
    grep -q "libggml-cuda.so.* => ${inst}/bin/../lib/" "${OUT}/ldd.txt" \
        || die "libggml-cuda not loaded from the install"
    "${inst}/bin/llama-server" --list-devices >"${OUT}/list_devices.txt" 2>&1 || true
    grep -q 'CUDA0' "${OUT}/list_devices.txt" || die "--list-devices shows no CUDA0"

    # 4. Serve the tiny model from the GPU, sampling nvidia-smi.
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -lms 200 \
        >"${OUT}/nvidia-smi.csv" 2>&1 &
    local smi=$!
    "${inst}/bin/llama-server" -m "${DATA}/tiny.gguf" -ngl 99 --host 127.0.0.1 --port "${PORT}" \
        -c 512 >"${OUT}/server.log" 2>&1 &
    local srv=$! t1=${SECONDS} ok=0
    for _ in $(seq 1 120); do
        if curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "${srv}" 2>/dev/null || break
        sleep 0.25
    done
    echo $((SECONDS - t1)) >"${OUT}/first_health_s.txt"
    local fail=""
    if [ "${ok}" = 1 ]; then
        curl -fsS --compressed "http://127.0.0.1:${PORT}/" >"${OUT}/index.html" || fail="GET / failed"
        grep -qi '<html' "${OUT}/index.html" || fail="GET / is not the web UI"
        curl -fsS "http://127.0.0.1:${PORT}/v1/chat/completions" -H 'Content-Type: application/json' \
            -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":8}' \
            >"${OUT}/chat.json" || fail="chat completion failed"
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv >"${OUT}/compute-apps.csv" || true
    else
        fail="server never answered /health"
    fi
    kill "${srv}" 2>/dev/null || true
    wait "${srv}" 2>/dev/null || true
    kill "${smi}" 2>/dev/null || true
    awk -F', ' 'NR>1 && $3+0>m {m=$3+0} END {print m+0}' "${OUT}/nvidia-smi.csv" \
        >"${OUT}/peak_mem_mib.txt"
    grep -Eq 'offloaded [0-9]+/[0-9]+ layers to GPU|CUDA0' "${OUT}/server.log" \
        || fail="${fail:+${fail}; }server log shows no GPU offload"
    [ -z "${fail}" ] || die "${fail}"
    summary pass "CUDA build for sm_${arch}: canary ok, tiny model served from CUDA0"
    log "PASS ($(cat "${OUT}/summary.json" | tr -d '\n'))"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
