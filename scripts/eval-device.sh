#!/usr/bin/env bash
# The eval's latency, before and after a change, on a quiet machine: the
# shared 2-core development box is too noisy for p50s. The device machine
# has no Rust toolchain, but release binaries built here run there
# unchanged; the model (98 MB) travels in two parts because one call
# carries at most 64 MiB, and files under /tmp stay while the machine is
# held.
#
# Here:  scripts/eval-device.sh pack NAME=EVAL_BINARY...
#          strips each eval bench binary (`cargo bench --bench eval
#          --no-run` prints its path) into target/eval-device/bin/eval-NAME
#          with the corpus and this script, and splits the model into
#          target/eval-device/model-1 and model-2.
# There, one call each, carrying the directory named:
#          bash scripts/eval-device.sh receive target/eval-device/model-1
#          bash scripts/eval-device.sh receive target/eval-device/model-2
#          bash scripts/eval-device.sh receive target/eval-device/bin
#          bash scripts/eval-device.sh run RPC NAME...
#        `run` evaluates each build in turn on the embedded engine, for one
#        RPC (decompose or enhance); answers, report and log land in
#        $OUT/NAME/.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
model_name="SmolLM2-135M-Instruct.Q4_1.gguf"
staging="/tmp/eval-device"

pack() {
  local dir="$here/../target/eval-device"
  local cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
  rm -rf "$dir"
  mkdir -p "$dir/bin" "$dir/model-1" "$dir/model-2"
  local build
  for build in "$@"; do
    strip -o "$dir/bin/eval-${build%%=*}" "${build#*=}"
  done
  cp "$here/../eval/tasks.json" "$dir/bin/"
  local model="$cache_dir/models/$model_name" half
  half=$(( ($(stat -c %s "$model") + 1) / 2 ))
  head -c "$half" "$model" > "$dir/model-1/part"
  tail -c +"$(( half + 1 ))" "$model" > "$dir/model-2/part"
  du -sh "$dir"/*
}

receive() {
  mkdir -p "$staging"
  cp -r "$1" "$staging/"
  ls -la "$staging"
}

run() {
  local rpc="$1"
  shift
  local cache="$staging/cache"
  mkdir -p "$cache/models"
  cat "$staging/model-1/part" "$staging/model-2/part" > "$cache/models/$model_name"
  echo "$(nproc) cores, $(uname -r), model $(sha256sum "$cache/models/$model_name" | cut -c1-16)"
  local name
  for name in "$@"; do
    echo "== $name"
    mkdir -p "$OUT/$name"
    RIGGER_CACHE_DIR="$cache" "$staging/bin/eval-$name" --backends embedded --only "$rpc" \
      --corpus "$staging/bin/tasks.json" --answers "$OUT/$name/answers" \
      --report "$OUT/$name/report.json" | tee "$OUT/$name/log"
  done
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  receive) shift; receive "$@" ;;
  run) shift; run "$@" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
