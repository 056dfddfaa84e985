#!/usr/bin/env bash
# MLX on CUDA through the device tool (an NVIDIA H200 with no Rust toolchain
# and no network): the MLX wheels, our release binary and SmolLM2's
# tokenizer travel from here in parts, since a call carries at most 64 MiB
# and the mlx-cuda-13 wheel alone is 90 MB.
#
# Here:  scripts/device-mlx-cuda.sh pack
#          (CARGO_TARGET_DIR set as for any build here) downloads the pinned
#          wheels into .device/wheels (ignored), builds and strips the
#          release binary, and writes $CARGO_TARGET_DIR/mlx-cuda-device/:
#          p0/, p1/ (the payload in parts) and kit/ (this script, the probe
#          and load helpers, the worker, the service's descriptors). That is
#          target/mlx-cuda-device of the checkout the device tool sends
#          (ignored), so each call names what it needs in `carry`.
# There, in consecutive calls (the machine keeps /tmp for 30 s after one):
#   1. carry [target/mlx-cuda-device/p0, target/mlx-cuda-device/kit]:
#        bash target/mlx-cuda-device/kit/device-mlx-cuda.sh receive
#   2. carry [.../p1, .../kit]:
#        bash target/mlx-cuda-device/kit/device-mlx-cuda.sh receive STEP...
#      Once every part is there, `receive` installs (wheels into
#      /tmp/rigger-mlx/site, the binary into /tmp/rigger-mlx/bin) and runs
#      the steps:
#        models   random-weight llamas with SmolLM2's tokenizer: 1b (bf16,
#                 the issue's 1.17 B shape) and smol4 (SmolLM2-135M's shape,
#                 4-bit like a converted GGUF); MODELS="smol4" builds fewer
#        repro    bare BatchGenerator loops (1 and 4 streams, at once and
#                 staggered), each bounded, step times printed
#                 (REPRO_RUNS="name:probe args;..." picks others)
#        worker   our worker over its line protocol, 1 and 4 streams
#        service  rigger-inference on MLX (RIGGER_MLX_MAX_BATCH=$MAX_BATCH,
#                 default 64): time to SERVING, the first request's TTFT
#                 after readiness, each prompt alone, then 1/4/16/64
#                 concurrent Generate streams compared with their answers
#                 alone (STREAMS, TOKENS, MODEL=1b|smol4 override)
#        direct   the runtime called directly, for the relay ratio: the same
#                 worker, model, max batch, prompts, seeds and load as
#                 `service`, over the worker's line protocol with no gateway
#                 (after `service`, whose worker compiled the kernels this
#                 one's warm-up finds in the cache)
#      Logs are kept under $OUT. While the machine is warm, later calls
#      carry only kit/ (e.g. `MODEL=smol4 TOKENS=64 bash .../kit/
#      device-mlx-cuda.sh receive service`); a fresh machine needs the
#      parts again.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
PART_SIZE=56m
WHEELS=(mlx-cuda-13==0.32.4 mlx==0.32.4 mlx-lm==0.32.2 llguidance==1.9.1)
WORK=/tmp/rigger-mlx

pack() {
  local repo target dir stage cache_dir
  repo="$(cd "$here/.." && pwd)"
  target="${CARGO_TARGET_DIR:-$repo/target}"
  dir="$target/mlx-cuda-device"
  cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
  # shellcheck source=/dev/null
  source "$cache_dir/build.env"
  mkdir -p "$repo/.device/wheels"
  local python="$cache_dir/venv/bin/python" spec
  for spec in "${WHEELS[@]}"; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$repo/.device/wheels" "$spec"
  done
  # The executable of this checkout's build: target/release/rigger-inference
  # is shared by every worktree that builds into this target directory.
  local executable
  executable="$(cd "$repo" && nice -n 10 cargo build --locked --release --bin rigger-inference \
    --message-format=json-render-diagnostics | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
  [ -x "$executable" ] || { echo "no rigger-inference executable built in $repo" >&2; exit 1; }
  python3 -c 'import sys; sys.exit(open(sys.argv[2], "rb").read() not in open(sys.argv[1], "rb").read())' \
    "$executable" "$repo/src/backend/mlx/worker.py" ||
    { echo "$executable does not embed this checkout's worker.py (another worktree built it?)" >&2; exit 1; }
  local descriptors
  descriptors="$(ls -t "$target"/release/build/rigger-inference-*/out/rigger_inference_descriptor.bin | head -1)"
  local tokenizer
  tokenizer="$(dirname "$(ls -t "$cache_dir"/mlx/*/tokenizer.json | head -1)")"

  rm -rf "$dir" && mkdir -p "$dir/kit"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage/wheels" "$stage/tokenizer" "$stage/bin"
  cp "$repo"/.device/wheels/*.whl "$stage/wheels/"
  cp "$tokenizer/tokenizer.json" "$tokenizer/tokenizer_config.json" "$stage/tokenizer/"
  strip -o "$stage/bin/rigger-inference" "$executable"
  gzip -9 "$stage/bin/rigger-inference"
  tar -C "$stage" -cf "$stage/payload.tar" wheels tokenizer bin
  (cd "$stage" && split -b "$PART_SIZE" -d payload.tar part-)
  local part index=0
  for part in "$stage"/part-*; do
    mkdir -p "$dir/p$index" && mv "$part" "$dir/p$index/"
    index=$((index + 1))
  done
  sha256sum "$stage/payload.tar" | cut -d' ' -f1 >"$dir/kit/payload.sha256"
  echo "$index" >"$dir/kit/parts"
  cp "$here/device-mlx-cuda.sh" "$here/mlx_cuda_probe.py" "$here/mlx_cuda_load.py" "$dir/kit/"
  cp "$repo/src/backend/mlx/worker.py" "$dir/kit/"
  cp "$descriptors" "$dir/kit/descriptors.bin"
  echo "binary $(git -C "$repo" describe --always --dirty); $index parts:"
  du -sh "$dir"/*
}

# Keeps this call's parts in /tmp; installs once all are there, then runs
# the steps asked for.
receive() {
  mkdir -p "$WORK/parts"
  local part
  for part in "$here"/../p*/part-*; do
    [ -e "$part" ] && cp "$part" "$WORK/parts/"
  done
  local have
  have="$(find "$WORK/parts" -name 'part-*' | wc -l)"
  echo "parts here: $have of $(cat "$here/parts")"
  [ "$have" -lt "$(cat "$here/parts")" ] && return 0
  install
  local step
  for step in "$@"; do
    echo "=== $step"
    "step_$step"
  done
}

install() {
  if [ ! -x "$WORK/bin/rigger-inference" ]; then
    cat "$WORK"/parts/part-* >"$WORK/payload.tar"
    [ "$(sha256sum "$WORK/payload.tar" | cut -d' ' -f1)" = "$(cat "$here/payload.sha256")" ] ||
      { echo "payload checksum differs: parts from another pack?" >&2; exit 1; }
    tar -C "$WORK" -xf "$WORK/payload.tar"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WORK"/wheels/*.whl
    gunzip -f "$WORK/bin/rigger-inference.gz"
    chmod +x "$WORK/bin/rigger-inference"
  fi
  export PYTHONPATH="$WORK/site" PYTHONUNBUFFERED=1
  python3 -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, mx.default_device(), "cuda", mx.cuda.is_available())'
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
}

step_models() {
  local shape
  for shape in ${MODELS:-1b smol4}; do
    [ -f "$WORK/models/$shape/config.json" ] && continue
    case "$shape" in
      1b) python3 "$here/mlx_cuda_probe.py" model "$WORK/models/1b" --tokenizer "$WORK/tokenizer" --shape 1b ;;
      smol4) python3 "$here/mlx_cuda_probe.py" model "$WORK/models/smol4" --tokenizer "$WORK/tokenizer" --shape smol --bits 4 ;;
    esac
  done
}

# Each loop in its own process, bounded, so one stall does not hide the
# rest; a loop still running after STALL_AFTER seconds has the GPU's load
# and every thread's native stack (cuda-gdb) logged.
step_repro() {
  local model="$WORK/models/${MODEL:-1b}" logs="${OUT:-/tmp}" name pid second
  local runs=("s1:--streams 1" "s4:--streams 4" "s4-stagger:--streams 4 --stagger 3" "s4-seeded:--streams 4 --seeded")
  # shellcheck disable=SC2206
  [ -n "${REPRO_RUNS:-}" ] && IFS=';' read -r -a runs <<<"$REPRO_RUNS"
  for run in "${runs[@]}"; do
    name="${run%%:*}"
    echo "--- batch $name"
    # shellcheck disable=SC2086
    python3 "$here/mlx_cuda_probe.py" batch "$model" ${run#*:} --tokens "${TOKENS:-64}" \
      >"$logs/repro-$name.log" 2>&1 &
    pid=$!
    for second in $(seq 1 "${REPRO_TIMEOUT:-90}"); do
      sleep 1
      kill -0 "$pid" 2>/dev/null || break
      if [ "$second" = "${STALL_AFTER:-45}" ]; then
        echo "still running after $second s; GPU: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
        timeout 60 cuda-gdb -p "$pid" -batch -ex 'thread apply all bt 14' >"$logs/gdb-$name.log" 2>&1 || true
        grep -E '^Thread|^#' "$logs/gdb-$name.log" | grep -v -E 'pthread_cond|futex|epoll|poll \(' | head -40 || true
      fi
    done
    kill "$pid" 2>/dev/null && echo "killed after ${REPRO_TIMEOUT:-90} s"
    wait "$pid" 2>/dev/null || true
    grep -v -E '^  File|^Thread|^Current thread|^$' "$logs/repro-$name.log" | tail -14
  done
}

step_worker() {
  local model="$WORK/models/${MODEL:-1b}" streams
  for streams in 1 4; do
    echo "--- worker, $streams streams"
    timeout "${REPRO_TIMEOUT:-90}" python3 "$here/mlx_cuda_probe.py" worker "$model" --streams "$streams" \
      --tokens "${TOKENS:-64}" --worker "$here/worker.py" 2>"${OUT:-/tmp}/worker-$streams.log" || echo "exit $?"
    tail -3 "${OUT:-/tmp}/worker-$streams.log"
  done
}

step_service() {
  local model="$WORK/models/${MODEL:-1b}" port=50151 log="${OUT:-/tmp}/service-${MODEL:-1b}.log" pid
  INFERENCE_BACKEND=mlx MLX_PYTHON="$(command -v python3)" RIGGER_MLX_MODEL="$model" \
    RIGGER_CACHE_DIR="$WORK/cache" RIGGER_LISTEN="127.0.0.1:$port" RIGGER_METRICS_LISTEN=127.0.0.1:0 \
    RIGGER_MLX_BLAS=off RIGGER_MLX_MAX_BATCH="${MAX_BATCH:-64}" RIGGER_MAX_IN_FLIGHT=64 RIGGER_MAX_QUEUE=256 \
    RIGGER_ON_TOPIC_SIMILARITY=0 RIGGER_MLX_START_TIMEOUT=15m RUST_LOG=info \
    "$WORK/bin/rigger-inference" >"$log" 2>&1 &
  pid=$!
  python3 "$here/mlx_cuda_load.py" "127.0.0.1:$port" "$here/descriptors.bin" \
    --streams "${STREAMS:-1,4,16,64}" --tokens "${TOKENS:-128}" || echo "load exit $?"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -i -E 'worker ready|warm-up|error|panic|test generation' | cut -c1-240 | tail -12 || true
}

step_direct() {
  local log="${OUT:-/tmp}/direct-${MODEL:-1b}.log"
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false python3 "$here/mlx_cuda_load.py" --worker "$here/worker.py" \
    --model "$WORK/models/${MODEL:-1b}" --cache-dir "$WORK/cache/mlx" --max-batch "${MAX_BATCH:-64}" \
    --no-alone --streams "${STREAMS:-1,4,16,64}" --tokens "${TOKENS:-128}" 2>"$log" || echo "direct exit $?"
  grep -E 'warm-up|Error' "$log" | cut -c1-240 | tail -4 || true
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  receive) shift; receive "$@" ;;
  *) sed -n '2,43p' "$0" >&2; exit 2 ;;
esac
