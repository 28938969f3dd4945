#!/usr/bin/env bash
# Reproduces the serving numbers in docs/performance.md (not run by CI).
#   bash benchmarks/server_measurements.sh [OUT_DIR]   # default OUT_DIR: benchmarks/results/<date>
# Starts `tokenmill serve` on the embedded model (prefix cache on, then off) and runs
# `tokenmill bench serve` workloads against it, one at a time so nothing competes for
# the CPU. EOS ids of SmolLM2 (0, 2) are banned through logit_bias.
set -euo pipefail
out=${1:-$(dirname "$0")/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
port=${PORT:-8123}
url=http://127.0.0.1:$port
ban=0,2

serve() {  # serve NAME [flags...]: starts a server and waits for /health
  name=$1; shift
  python -m tokenmill serve --port "$port" --kv-cache-memory 2GiB --disable-access-log "$@" \
    > "$out/server-$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do curl -sf "$url/health" > /dev/null && return; sleep 1; done
  echo "server $name did not start" >&2; exit 1
}
stop() { kill -TERM "$pid"; wait "$pid" || true; }
bench() { python -m tokenmill bench serve --base-url "$url" --ban-token-ids $ban \
            --disable-tqdm --seed 0 "$@"; }

serve cache-on
bench --endpoint chat --input-len 100 --output-len 128 --num-prompts 3 --max-concurrency 1 \
  --result-json "$out/single-chat.json" | tee "$out/single-chat.txt"
bench --input-len 100 --output-len 128 --num-prompts 32 --max-concurrency 32 \
  --result-json "$out/concurrent-32.json" --plot "$out/concurrent-32.png" \
  | tee "$out/concurrent-32.txt"
bench --dataset shared-prefix --prefix-len 1000 --num-groups 4 --num-prompts 32 \
  --input-len 32 --output-len 16 --max-concurrency 8 \
  --result-json "$out/shared-prefix-on.json" | tee "$out/shared-prefix-on.txt"
bench --dataset multi-turn --num-conversations 8 --turns 4 --input-len 48 --output-len 32 \
  --result-json "$out/multi-turn-on.json" | tee "$out/multi-turn-on.txt"
stop

serve cache-off --no-prefix-caching
bench --dataset shared-prefix --prefix-len 1000 --num-groups 4 --num-prompts 32 \
  --input-len 32 --output-len 16 --max-concurrency 8 \
  --result-json "$out/shared-prefix-off.json" | tee "$out/shared-prefix-off.txt"
bench --dataset multi-turn --num-conversations 8 --turns 4 --input-len 48 --output-len 32 \
  --result-json "$out/multi-turn-off.json" | tee "$out/multi-turn-off.txt"
stop
