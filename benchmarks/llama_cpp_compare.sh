#!/usr/bin/env bash
# Same serving workload against tokenmill and llama.cpp (llama-cpp-python's OpenAI server),
# in one run, on the same GGUF. NOT part of CI: the first run builds llama-cpp-python from
# source, about 15 minutes on a 2-core machine.
#
#   benchmarks/llama_cpp_compare.sh [OUT_DIR]   # default OUT_DIR: benchmarks/results/<date>
#
# What it does:
#   1. Creates a separate venv ($LLAMA_VENV) with `pip install 'llama-cpp-python[server]'`
#      (skipped when it already imports), so llama.cpp's dependencies never touch ours.
#   2. For each server in turn (one at a time, so they never compete for the cores):
#        llama-cpp-python:  python -m llama_cpp.server --model $MODEL --n_threads $THREADS
#                           --port $LC_PORT --interrupt_requests False
#                           (by default it cancels a running request when another arrives)
#        llama-server:      $LLAMA_SERVER -m $MODEL -t $THREADS -np 32 -c 8192 --port $LS_PORT
#                           (llama.cpp's own C++ server, 32 slots with continuous batching;
#                           only when $LLAMA_SERVER names the binary, see below)
#        tokenmill:         tokenmill serve --model $MODEL --port $TM_PORT
#      waits for GET /v1/models, then runs, for each concurrency in $CONCURRENCIES,
#        tokenmill bench serve --input-len $INPUT_LEN --output-len $OUTPUT_LEN
#            --ban-token-ids $BAN_IDS --max-concurrency C --num-prompts max(8, C) --seed C
#      (a seed per concurrency: the runs send different prompts, so no server reuses
#      the previous run's cached prompts)
#      writing OUT_DIR/<server>_c<C>.json and .png, then stops the server and records its
#      peak RSS (VmHWM) in OUT_DIR/rss.txt.
#   3. Prints a table: output tok/s, p50 TTFT, mean TPOT, single-stream decode tok/s.
#   With ROUNDS=N the servers take turns N times (files <server>_r<i>_c<C>.json), so a
#   machine whose speed drifts (this one's does, by up to 1.5x within minutes) hits them
#   alike.
#
# Fairness notes: EOS is banned through logit_bias (both servers honour it), so both
# generate exactly OUTPUT_LEN tokens; temperature 0 (greedy). llama-cpp-python defaults to
# repeat_penalty 1.1, top_k 40, min_p 0.05: the llama.cpp runs send repeat_penalty 1.0 so
# the two do the same sampling work. llama-cpp-python ignores stream_options, so for it the
# benchmark counts one token per streamed chunk and takes prompt lengths from the
# calibration probes (non-streamed responses carry usage).
#
# llama-server is not on PyPI as a binary, but its source is: the llama-cpp-python sdist
# vendors llama.cpp. To build it (about 15 minutes on 2 cores):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-*.tar.gz
#   cd llama_cpp_python-*/vendor/llama.cpp && cmake -S . -B build -DCMAKE_BUILD_TYPE=Release \
#       -DLLAMA_CURL=OFF -DGGML_NATIVE=ON && cmake --build build --target llama-server -j 2
#   export LLAMA_SERVER=$PWD/build/bin/llama-server
#
# Environment (defaults):
#   PYTHON=.venv/bin/python   the tokenmill venv's python (runs `-m tokenmill`)
#   LLAMA_VENV=$HOME/.cache/tokenmill/llama-cpp-venv
#   MODEL=<the embedded SmolLM2-135M-Instruct GGUF>   THREADS=2
#   TM_PORT=8100  LC_PORT=8101  LS_PORT=8102  INPUT_LEN=130  OUTPUT_LEN=64
#   LLAMA_SERVER=""   path of a llama-server binary (skipped when empty)
#   BAN_IDS=0,2 (SmolLM2's <|endoftext|> and <|im_end|>)   CONCURRENCIES="1 32"
#   TM_ARGS=""   extra flags for `tokenmill serve`
#   LC_ARGS=""   extra flags for `llama_cpp.server`
#   ROUNDS=1     how many times the servers take turns
#   LLAMA_CPP_PYTHON=1   also run llama-cpp-python's server (0: skip it, and its build)
#   TM_BEFORE=""  a checkout of an earlier tokenmill (e.g. `git worktree add /tmp/before
#                 REV`): its server runs too, as "tokenmill_before", for before/after rows
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
LLAMA_VENV=${LLAMA_VENV:-$HOME/.cache/tokenmill/llama-cpp-venv}
THREADS=${THREADS:-2}
TM_PORT=${TM_PORT:-8100}
LC_PORT=${LC_PORT:-8101}
LS_PORT=${LS_PORT:-8102}
LLAMA_SERVER=${LLAMA_SERVER:-}
INPUT_LEN=${INPUT_LEN:-130}
OUTPUT_LEN=${OUTPUT_LEN:-64}
BAN_IDS=${BAN_IDS:-0,2}
CONCURRENCIES=${CONCURRENCIES:-"1 32"}
TM_ARGS=${TM_ARGS:-}
LC_ARGS=${LC_ARGS:-}
ROUNDS=${ROUNDS:-1}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-1}
TM_BEFORE=${TM_BEFORE:-}
MODEL=${MODEL:-$("$PYTHON" -c \
    "from tokenmill.loader.default_model import default_model_path; print(default_model_path())")}
OUT=${1:-benchmarks/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

wait_ready() {  # URL TIMEOUT_S: poll GET URL/v1/models until it answers 200
    "$PYTHON" - "$1" "$2" <<'EOF'
import sys, time, urllib.request
url, deadline = sys.argv[1] + "/v1/models", time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(f"no server answered at {url}")
EOF
}

if [[ "$LLAMA_CPP_PYTHON" == 1 ]]; then
    echo "== 1. llama-cpp-python in $LLAMA_VENV"
    if ! "$LLAMA_VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
        python3 -m venv "$LLAMA_VENV"
        echo "building llama-cpp-python from source (about 15 minutes on 2 cores) ..."
        "$LLAMA_VENV/bin/pip" install -q 'llama-cpp-python[server]'
    fi
    "$LLAMA_VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
fi

run_workload() {  # NAME PORT EXTRA_BENCH_ARGS...
    local name=$1$SUFFIX port=$2
    shift 2
    for c in $CONCURRENCIES; do
        local n=$(( c > 8 ? c : 8 ))
        echo "-- $name, concurrency $c, $n prompts"
        "$PYTHON" -m tokenmill bench serve --base-url "http://127.0.0.1:$port" \
            --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ban-token-ids "$BAN_IDS" \
            --num-prompts "$n" --max-concurrency "$c" --seed "$c" \
            --result-json "$OUT/${name}_c$c.json" --plot "$OUT/${name}_c$c.png" "$@"
    done
    echo "$name peak RSS: $(grep VmHWM "/proc/$SERVER_PID/status" | awk '{print $2, $3}')" \
        | tee -a "$OUT/rss.txt"
}

for round in $(seq 1 "$ROUNDS"); do
SUFFIX=""
[[ "$ROUNDS" -gt 1 ]] && SUFFIX="_r$round"
if [[ "$LLAMA_CPP_PYTHON" == 1 ]]; then
    echo "== 2a. llama.cpp server on port $LC_PORT"
    # shellcheck disable=SC2086
    "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$MODEL" --n_threads "$THREADS" \
        --port "$LC_PORT" --interrupt_requests False $LC_ARGS > "$OUT/llamacpp_server.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "http://127.0.0.1:$LC_PORT" 300
    run_workload llamacpp "$LC_PORT" --extra-body '{"repeat_penalty": 1.0}'
    stop_server
fi

if [[ -n "$LLAMA_SERVER" ]]; then
    echo "== 2b. llama-server (C++) on port $LS_PORT"
    "$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -np 32 -c 8192 --port "$LS_PORT" \
        > "$OUT/llamaserver.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "http://127.0.0.1:$LS_PORT" 300
    run_workload llamaserver "$LS_PORT"
    stop_server
fi

echo "== 2c. tokenmill server on port $TM_PORT"
# shellcheck disable=SC2086
"$PYTHON" -m tokenmill serve --model "$MODEL" --port "$TM_PORT" --disable-access-log \
    $TM_ARGS > "$OUT/tokenmill_server.log" 2>&1 &
SERVER_PID=$!
wait_ready "http://127.0.0.1:$TM_PORT" 300
run_workload tokenmill "$TM_PORT"
stop_server

if [[ -n "$TM_BEFORE" ]]; then
    echo "== 2d. tokenmill from $TM_BEFORE on port $TM_PORT"
    # shellcheck disable=SC2086
    PYTHONPATH="$TM_BEFORE" "$PYTHON" -m tokenmill serve --model "$MODEL" --port "$TM_PORT" \
        --disable-access-log $TM_ARGS > "$OUT/tokenmill_before_server.log" 2>&1 &
    SERVER_PID=$!
    wait_ready "http://127.0.0.1:$TM_PORT" 300
    run_workload tokenmill_before "$TM_PORT"
    stop_server
fi

done

echo "== 3. summary ($OUT)"
"$PYTHON" - "$OUT" $CONCURRENCIES <<'EOF'
import json, os, sys
out, concurrencies = sys.argv[1], sys.argv[2:]
print(f"{'server':<16}{'conc':>5}{'out tok/s':>11}{'p50 TTFT ms':>13}{'mean TPOT ms':>14}"
      f"{'decode tok/s':>14}{'in len':>8}{'ok/fail':>9}")
names = sorted({f.rsplit("_c", 1)[0] for f in os.listdir(out) if f.endswith(".json")},
               key=lambda n: (n.split("_r")[-1] if "_r" in n else "", n))
for name in names:
    for c in concurrencies:
        path = os.path.join(out, f"{name}_c{c}.json")
        if not os.path.exists(path):
            continue
        m = json.load(open(path))["metrics"]
        decode = 1000 / m["mean_tpot_ms"] if m["mean_tpot_ms"] else 0.0
        print(f"{name:<16}{c:>5}{m['output_throughput']:>11.1f}{m['p50_ttft_ms']:>13.0f}"
              f"{m['mean_tpot_ms']:>14.1f}{decode:>14.1f}{m['mean_input_len']:>8.0f}"
              f"{m['completed']:>5}/{m['failed']}")
EOF
