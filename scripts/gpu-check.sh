#!/usr/bin/env bash
# GPU check of the llama_cpp build, for a session that has an NVIDIA GPU box (not run in CI).
#
#   scripts/gpu-check.sh prepare      # on the controller (has the cache, Python, gguf)
#   scripts/gpu-check.sh run          # on the GPU machine (offline is fine)
#
# `prepare` puts into .cache/gpu-check/ (git-ignored; carry it to the GPU machine, ~25 MB): the
# source tarball (sdist tree + prebuilt web UI, from llamavm.artifacts.source), a tiny GGUF, the
# vocabs and chat templates the MoE stand-ins are written from, and wheels of what the GPU machine
# lacks (gguf, ansible-core, resolvelib).
# `run` then, with the same cmake flags as the llama_cpp role's CUDA build:
#   1. checks the toolchain (nvidia-smi, nvcc + cuBLAS, cmake, a C++ compiler) and fails fast;
#      the gpu role's card table against nvidia-smi (gpu-role.json), and the role's own preflight
#      + verify tasks run by ansible-playbook on the machine (scripts/gpu-check-role.yml), as a
#      VM would plan it and as a native host (its driver checked, the toolkit only);
#   2. configures + compiles llama-server with GGML_CUDA=ON for the GPU's compute capability
#      (9.0 -> sm_90 on an H100/H200; LLAMAVM_CUDA_ARCH overrides), FlashAttention kernels on,
#      while the Qwen3-MoE and GPT-OSS stand-ins (config/tiny-models.yaml) and a 1 GiB f16 llama
#      are written in the background;
#   3. canary: `llama-server --version` and `--list-devices` must show CUDA0; ldd resolves all;
#   4. serves the tiny model fully offloaded (-ngl 99), samples nvidia-smi every 200 ms while
#      it loads and answers /health, /, and a chat completion; checks the server used CUDA0;
#   5. serves each MoE stand-in from the GPU: its designed answer must come back;
#   6. bench: the 1 GiB model on the GPU (-ngl 99) against the CPU (-ngl 0) of the same machine:
#      load time, prompt and generation tokens/s, as ratios (bench.json).
# LLAMAVM_GPU_CHECK_SERVER=<dir with bin/llama-server> skips the build (a dry run of the rest).
# Results go to $OUT (or .cache/gpu-check-out): summary.json, bench.json, logs, nvidia-smi.csv.
set -euo pipefail

SRV="" LOAD="" SERVER="" MODELS=""

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
for name in ("arch", "nvcc", "build_s", "canary_version", "first_health_s", "peak_mem_mib",
             "role_check", "moe_check"):
    path = os.path.join(out, name + ".txt")
    if os.path.exists(path):
        data[name] = open(path).read().strip()
for name in ("bench", "gpu-role"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        data[name] = json.load(open(path))
json.dump(data, open(os.path.join(out, "summary.json"), "w"), indent=2)
PY
}

prepare() {
    local py="${HERE}/.venv/bin/python"
    [ -x "${py}" ] || py=python3
    mkdir -p "${DATA}"
    local tarball
    tarball=$(cd "${HERE}" && "${py}" -m llamavm.artifacts.source prepare)
    cp "${tarball}" "${DATA}/llama.cpp.tar.gz"
    # The cache layout llamavm.artifacts.tinymodel looks in (src/*/vendor/llama.cpp/<path>): the
    # vocabs and chat templates the stand-ins are written from on the GPU machine (45 MB each: too
    # big to carry).
    (cd "${HERE}" && "${py}" -c "
import json, shutil, yaml
from pathlib import Path
from llamavm.artifacts import tinymodel
data = Path('${DATA}')
tinymodel.write(tinymodel.TinySpec(name='gpu-check'), data / 'tiny.gguf')
cards = yaml.safe_load(Path('ansible/roles/gpu/vars/main.yml').read_text())['__gpu_cards']
(data / 'gpu-cards.json').write_text(json.dumps(cards))
tree = data / 'src' / 'gpu-check' / 'vendor' / 'llama.cpp'
specs = yaml.safe_load(Path('config/tiny-models.yaml').read_text())
paths = ['models/' + tinymodel.VOCAB_NAME, 'models/' + tinymodel.BPE_VOCAB_NAME]
for rel in paths + [spec['template'] for spec in specs if spec.get('template')]:
    (tree / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tinymodel.find_in_source(rel), tree / rel)
")
    # What the GPU machine's Python lacks (it has numpy, PyYAML, jinja2, packaging, requests, tqdm).
    rm -rf "${DATA}/whl"
    "${py}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 -d "${DATA}/whl" \
        gguf==0.19.0 "ansible-core==$("${py}" -c 'import ansible.release as r; print(r.__version__)')" \
        resolvelib==1.2.1
    du -sh "${DATA}"
    log "carry .cache/gpu-check to the GPU machine, then: scripts/gpu-check.sh run"
}

find_nvcc() {
    local c
    for c in "${CUDACXX:-}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)" /usr/bin/nvcc; do
        [ -n "${c}" ] && [ -x "${c}" ] && { echo "${c}"; return 0; }
    done
    return 1
}

# serve NAME GGUF NGL [ARGS...]: start llama-server on PORT (pid in SRV), wait for /health
# (seconds in LOAD). Not in a subshell: SRV and LOAD are the caller's.
serve() {
    local name=$1 model=$2 ngl=$3
    shift 3
    if curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1; then
        log "port ${PORT} already answers: another server is left running (LLAMAVM_GPU_CHECK_PORT)"
        return 1
    fi
    "${SERVER}" -m "${model}" -ngl "${ngl}" --host 127.0.0.1 --port "${PORT}" "$@" \
        >"${OUT}/server-${name}.log" 2>&1 &
    SRV=$!
    local t0 i
    t0=$(date +%s.%N)
    for i in $(seq 1 600); do
        if curl -fsS "http://127.0.0.1:${PORT}/health" >/dev/null 2>&1; then
            LOAD=$(python3 -c "print(round($(date +%s.%N) - ${t0}, 2))")
            return 0
        fi
        kill -0 "${SRV}" 2>/dev/null || break
        sleep 0.1
    done
    return 1
}

# A machine without curl (a bare CUDA image) gets the few requests this script makes from Python.
if ! command -v curl >/dev/null; then
    curl() {
        python3 - "$@" <<'PY'
import gzip, sys, urllib.request
args, url, data, headers, timeout = sys.argv[1:], None, None, {}, 30.0
i = 0
while i < len(args):
    a = args[i]
    if a == "-d":
        data, i = args[i + 1].encode(), i + 1
    elif a == "-H":
        k, v = args[i + 1].split(":", 1); headers[k.strip()] = v.strip(); i += 1
    elif a == "--max-time":
        timeout, i = float(args[i + 1]), i + 1
    elif a.startswith("http"):
        url = a
    i += 1
try:
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        sys.stdout.buffer.write(body)
except Exception as e:
    print(f"curl (python): {url}: {e}", file=sys.stderr)
    sys.exit(22)
PY
    }
fi

gpu_mem_mib() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' '
}

# on_gpu NAME BASE_MIB: whether the server now running holds GPU memory (its log says it offloaded,
# or the card's used memory grew by 100 MiB or more since BASE_MIB; nvidia-smi in a container
# often lists no processes, so compute-apps is no proof either way). The growth goes to a file.
on_gpu() {
    local now=$(($(gpu_mem_mib || echo 0) + 0))
    echo "$((now - $2))" >"${OUT}/gpu-mem-${1}.txt"
    grep -Eq 'offloaded [0-9]+/[0-9]+ layers to GPU|CUDA0' "${OUT}/server-${1}.log" \
        || [ $((now - $2)) -ge 100 ]
}

unserve() {
    kill "${SRV}" 2>/dev/null || true
    wait "${SRV}" 2>/dev/null || true
}

# chat BODY_JSON FILE: one chat completion into FILE.
chat() {
    curl -fsS --max-time 120 "http://127.0.0.1:${PORT}/v1/chat/completions" \
        -H 'Content-Type: application/json' -d "$1" >"$2"
}

# The gpu role's own preflight + verify on this machine, by ansible-playbook (no installs).
role_check() {
    local card=() log="${OUT}/gpu-role.log"
    if ! command -v lspci >/dev/null; then
        # No pciutils here: the card name nvidia-smi gives stands in for lspci's.
        card=(-e "{\"gpu_card\": \"$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)\"}")
        log "no lspci on this machine: the role plans from nvidia-smi's card name"
    fi
    if (cd "${HERE}" && LC_ALL=C.UTF-8 ANSIBLE_ROLES_PATH=ansible/roles ANSIBLE_NOCOLOR=1 \
        timeout 120 python3 -m ansible playbook scripts/gpu-check-role.yml "${card[@]}") \
        >"${log}" 2>&1; then
        echo "pass: $(grep -o '"compute_capability": "[^"]*"' "${log}" | head -1)" \
            >"${OUT}/role_check.txt"
    else
        echo "fail: $(grep -m1 -E 'fatal|ERROR' "${log}" | cut -c1-300)" >"${OUT}/role_check.txt"
    fi
    # The host-native path (issue 25): the same role on this box as a native host — its driver
    # found and checked against the toolkit, the toolkit the only thing it would install.
    if (cd "${HERE}" && LC_ALL=C.UTF-8 ANSIBLE_ROLES_PATH=ansible/roles ANSIBLE_NOCOLOR=1 \
        timeout 120 python3 -m ansible playbook scripts/gpu-check-role.yml \
        -e llamavm_check_platform=native) >"${OUT}/gpu-role-native.log" 2>&1; then
        echo "native pass: $(grep -o '"driver_version": "[^"]*"' "${OUT}/gpu-role-native.log" \
            | head -1)" >>"${OUT}/role_check.txt"
    else
        echo "native fail: $(grep -m1 -E 'fatal|ERROR' "${OUT}/gpu-role-native.log" \
            | cut -c1-300)" >>"${OUT}/role_check.txt"
    fi
    log "gpu role: $(tr '\n' ' ' <"${OUT}/role_check.txt")"
}

# Write the MoE stand-ins and the bench model (runs in the background during the build).
write_models() {
    (cd "${HERE}" && LLAMAVM_CACHE="${DATA}" python3 -c "
import yaml
from pathlib import Path
from llamavm.artifacts import tinymodel
out = Path('${MODELS}')
for entry in yaml.safe_load(Path('config/tiny-models.yaml').read_text()):
    entry = dict(entry)
    target = out / Path(entry.pop('file')).name
    spec = tinymodel.TinySpec(**entry)
    tinymodel.write(spec, target, tinymodel.find_vocab(name=tinymodel.BPE_VOCAB_NAME))
# About 1 GiB of f16 weights: big enough that the GPU/CPU difference is the weights' reading.
bench = tinymodel.TinySpec('gpu-bench', seed=3, n_embd=2048, n_layer=8, n_head=16,
                           n_head_kv=16, n_ff=5632, dtype='f16')
tinymodel.write(bench, out / 'bench.gguf', tinymodel.find_vocab())
") >"${OUT}/models.log" 2>&1
}

# bench NGL: load time and tokens/s of the bench model with NGL layers on the GPU.
bench_one() {
    local ngl=$1 load base
    base=$(($(gpu_mem_mib || echo 0) + 0))
    serve "bench-ngl${ngl}" "${MODELS}/bench.gguf" "${ngl}" -c 4096 -fa on || { unserve; return 1; }
    load=${LOAD}
    on_gpu "bench-ngl${ngl}" "${base}" || true
    local prompt
    prompt=$(python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 40))")
    local i
    for i in 1 2 3; do
        chat "{\"messages\":[{\"role\":\"user\",\"content\":\"${prompt} ${i}\"}],\"max_tokens\":128,\"ignore_eos\":true,\"temperature\":0,\"cache_prompt\":false}" \
            "${OUT}/bench-ngl${ngl}-${i}.json" || { unserve; return 1; }
    done
    unserve
    python3 - "${OUT}" "${ngl}" "${load}" <<'PY'
import json, statistics, sys
out, ngl, load = sys.argv[1], sys.argv[2], float(sys.argv[3])
runs = [json.load(open(f"{out}/bench-ngl{ngl}-{i}.json"))["timings"] for i in (1, 2, 3)]
row = {"ngl": int(ngl), "load_s": load,
       "gpu_mem_growth_mib": int(open(f"{out}/gpu-mem-bench-ngl{ngl}.txt").read() or 0),
       "prompt_tokens": runs[-1]["prompt_n"], "predicted_tokens": runs[-1]["predicted_n"],
       "prompt_tps": round(statistics.median(r["prompt_per_second"] for r in runs), 1),
       "gen_tps": round(statistics.median(r["predicted_per_second"] for r in runs), 1)}
json.dump(row, open(f"{out}/bench-ngl{ngl}.json", "w"))
print(json.dumps(row))
PY
}

run() {
    mkdir -p "${OUT}"
    local work=${LLAMAVM_GPU_CHECK_WORK:-/tmp/llamavm-gpu-check}
    MODELS="${work}/models"
    [ -f "${DATA}/llama.cpp.tar.gz" ] || die "no ${DATA}/llama.cpp.tar.gz: run 'prepare' and carry it"
    rm -rf "${work}"
    mkdir -p "${work}/src" "${MODELS}"
    if [ -d "${DATA}/whl" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "${work}/site" \
            "${DATA}"/whl/*.whl >"${OUT}/pip.log" 2>&1 || log "wheels not installed (pip.log)"
    fi
    export PYTHONPATH="${work}/site:${HERE}${PYTHONPATH:+:${PYTHONPATH}}"

    # 1. Toolchain, fail fast (device time is scarce).
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv \
        | tee "${OUT}/gpu.csv" >&2
    local cap arch nvcc
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')
    arch=${LLAMAVM_CUDA_ARCH:-${cap/./}}
    echo "${arch}" >"${OUT}/arch.txt"
    # The gpu role's card table: the compute capability it plans for this card is the card's own.
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
    role_check
    write_models &
    local writer=$!

    if [ -n "${LLAMAVM_GPU_CHECK_SERVER:-}" ]; then
        SERVER="${LLAMAVM_GPU_CHECK_SERVER}/bin/llama-server"
        log "dry run with ${SERVER} (no build)"
    else
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
        tar -xzf "${DATA}/llama.cpp.tar.gz" -C "${work}/src" --strip-components=1
        [ -f "${work}/src/tools/ui/dist/index.html" ] || die "tarball has no prebuilt web UI"
        # Jobs: one per core, capped by memory (2 GiB a job) unless LLAMAVM_GPU_CHECK_JOBS says
        # (a microVM's MemTotal can start far below what it grows to).
        local jobs mem_jobs generator=()
        jobs=$(nproc)
        mem_jobs=$(($(awk '/MemTotal/ {print int($2/1024/1024)}' /proc/meminfo) / 2))
        [ "${mem_jobs}" -lt "${jobs}" ] && jobs=${mem_jobs}
        [ "${jobs}" -lt 1 ] && jobs=1
        jobs=${LLAMAVM_GPU_CHECK_JOBS:-${jobs}}
        command -v ninja >/dev/null && generator=(-G Ninja)
        local t0=${SECONDS}
        log "configuring for sm_${arch} with ${nvcc}, -j${jobs} ${generator[*]}"
        cmake -S "${work}/src" -B "${work}/build" "${generator[@]}" \
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
        find "${work}/build" -name 'lib*.so*' -not -path '*/CMakeFiles/*' -exec cp -P -t "${inst}/lib" {} +
        ls -la "${inst}/lib" >"${OUT}/libs.txt"
        SERVER="${inst}/bin/llama-server"

        # 3. Canary.
        "${SERVER}" --version >"${OUT}/canary_version.txt" 2>&1 || die "--version failed"
        ldd "${SERVER}" >"${OUT}/ldd.txt"
        grep -q 'not found' "${OUT}/ldd.txt" && die "unresolved libraries: $(grep 'not found' "${OUT}/ldd.txt")"
        grep -q "libggml-cuda.so.* => ${inst}/bin/../lib/" "${OUT}/ldd.txt" \
            || die "libggml-cuda not loaded from the install"
        "${SERVER}" --list-devices >"${OUT}/list_devices.txt" 2>&1 || true
        grep -q 'CUDA0' "${OUT}/list_devices.txt" || die "--list-devices shows no CUDA0"
    fi

    # 4. Serve the tiny model from the GPU, sampling nvidia-smi.
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -lms 200 \
        >"${OUT}/nvidia-smi.csv" 2>&1 &
    local smi=$! fail="" base
    base=$(($(gpu_mem_mib || echo 0) + 0))
    if serve tiny "${DATA}/tiny.gguf" 99 -c 512; then
        echo "${LOAD}" >"${OUT}/first_health_s.txt"
        on_gpu tiny "${base}" || fail="the tiny model holds no GPU memory (log, nvidia-smi)"
        curl -fsS --compressed "http://127.0.0.1:${PORT}/" >"${OUT}/index.html" || fail="GET / failed"
        grep -qi '<html' "${OUT}/index.html" || fail="GET / is not the web UI"
        chat '{"messages":[{"role":"user","content":"hi"}],"max_tokens":8}' "${OUT}/chat.json" \
            || fail="chat completion failed"
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv >"${OUT}/compute-apps.csv" || true
    else
        fail="server never answered /health"
    fi
    unserve

    # 5. The MoE stand-ins of the production models, fully offloaded: the designed answer.
    wait "${writer}" || { tail -5 "${OUT}/models.log" >&2; fail="${fail:+${fail}; }stand-ins not written"; }
    local moe="" name want
    for name in qwen3-coder-30b-a3b-tiny gpt-oss-120b-tiny; do
        want=$(python3 -c "
import yaml; print(next(e['answer'] for e in yaml.safe_load(open('${HERE}/config/tiny-models.yaml'))
                        if '${name}' in e['file']))")
        base=$(($(gpu_mem_mib || echo 0) + 0))
        if serve "${name}" "${MODELS}/${name}.gguf" 99 -c 2048 -fa on --jinja \
            && chat '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":48,"temperature":0}' \
                "${OUT}/chat-${name}.json" \
            && grep -qF "${want}" "${OUT}/chat-${name}.json" \
            && on_gpu "${name}" "${base}"; then
            moe="${moe}${name}: ok; "
        else
            moe="${moe}${name}: FAILED; "
            fail="${fail:+${fail}; }${name} did not answer from the GPU"
        fi
        unserve
    done
    echo "${moe}" >"${OUT}/moe_check.txt"
    log "stand-ins: ${moe}"

    # 6. Bench: the same 1 GiB model on the GPU and on this machine's CPU.
    if bench_one 99 >&2 && bench_one 0 >&2; then
        python3 - "${OUT}" <<'PY'
import json, sys
out = sys.argv[1]
gpu, cpu = (json.load(open(f"{out}/bench-ngl{n}.json")) for n in (99, 0))
json.dump({"gpu": gpu, "cpu": cpu,
           "gen_speedup": round(gpu["gen_tps"] / cpu["gen_tps"], 1),
           "prompt_speedup": round(gpu["prompt_tps"] / cpu["prompt_tps"], 1),
           "load_ratio": round(gpu["load_s"] / cpu["load_s"], 2)},
          open(f"{out}/bench.json", "w"), indent=2)
PY
    else
        fail="${fail:+${fail}; }bench failed"
    fi
    kill "${smi}" 2>/dev/null || true
    awk -F', ' 'NR>1 && $3+0>m {m=$3+0} END {print m+0}' "${OUT}/nvidia-smi.csv" \
        >"${OUT}/peak_mem_mib.txt"
    [ -z "${fail}" ] || die "${fail}"
    summary pass "CUDA build for sm_${arch}: canary ok, tiny model and MoE stand-ins served from CUDA0"
    log "PASS ($(tr -d '\n' <"${OUT}/summary.json"))"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
