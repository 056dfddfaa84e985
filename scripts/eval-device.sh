#!/usr/bin/env bash
# The eval's latency, before and after a change, on a quiet machine: the
# shared 2-core development box is too noisy for p50s. The device machine
# has no Rust toolchain, but release binaries built here run there
# unchanged; the models (116 MB) travel in two parts because one call
# carries at most 64 MiB, and files under /tmp stay while the machine is
# held.
#
# Here:  scripts/eval-device.sh pack NAME=EVAL_BINARY...
#          strips each eval bench binary (`cargo bench --bench eval
#          --no-run` prints its path) into target/eval-device/bin/eval-NAME
#          with the corpus and this script, and splits the models into
#          target/eval-device/model-1 and model-2.
# There, one call each, carrying the directory named:
#          bash scripts/eval-device.sh receive target/eval-device/model-1
#          bash scripts/eval-device.sh receive target/eval-device/model-2
#          bash scripts/eval-device.sh receive target/eval-device/bin
#          bash scripts/eval-device.sh run RPC SLICES NAME...
#        `run` evaluates every build on the embedded engine for one RPC
#        (decompose or enhance), the corpus cut into SLICES parts, all
#        builds and slices at once, one process each on one engine thread
#        (as on the 2-core box; processes up to the core count then do not
#        slow each other); then merges each build's answers into
#        $OUT/NAME/embedded-RPC.json and prints, per build, calls answered,
#        latency p50/p95 and mean attempts and completion tokens per call.
# Also:  bash scripts/eval-device.sh summary FILE...  (the same of saved files)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
model_name="SmolLM2-135M-Instruct.Q4_1.gguf"
meaning_name="wordllama-l2-supercat-256"
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
  # The models (the chat model and the on-topic rule's embeddings) as one
  # tar cut in two.
  tar -C "$cache_dir/models" -cf "$dir/models.tar" "$model_name" "$meaning_name"
  split -n 2 "$dir/models.tar" "$dir/models."
  rm "$dir/models.tar"
  mv "$dir/models.aa" "$dir/model-1/part"
  mv "$dir/models.ab" "$dir/model-2/part"
  du -sh "$dir"/*
}

receive() {
  mkdir -p "$staging"
  cp -r "$1" "$staging/"
  ls -la "$staging"
}

run() {
  local rpc="$1" slices="$2"
  shift 2
  local cache="$staging/cache"
  mkdir -p "$cache/models"
  cat "$staging/model-1/part" "$staging/model-2/part" | tar -x -C "$cache/models"
  echo "$(nproc) cores, $(uname -r), model $(sha256sum "$cache/models/$model_name" | cut -c1-16)"
  python3 - "$staging/bin/tasks.json" "$slices" "$staging/slices" <<'PY'
import json, os, sys
tasks, slices, into = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
os.makedirs(into, exist_ok=True)
for index in range(slices):
    json.dump(tasks[index::slices], open(f"{into}/{index}.json", "w"))
PY
  local name slice
  for name in "$@"; do
    for slice in $(seq 0 $(( slices - 1 ))); do
      # Slices stay on the device: only what `files` can bring back (a
      # few files) goes to $OUT.
      mkdir -p "$staging/runs/$name/$slice" "$OUT/$name"
      RIGGER_CACHE_DIR="$cache" RIGGER_THREADS=1 "$staging/bin/eval-$name" --backends embedded --only "$rpc" \
        --corpus "$staging/slices/$slice.json" --answers "$staging/runs/$name/$slice" \
        --report "$staging/runs/$name/$slice/report.json" > "$staging/runs/$name/$slice/log" 2>&1 &
    done
  done
  wait
  for name in "$@"; do
    python3 - "$staging/runs/$name" "$OUT/$name" "$rpc" "$slices" <<'PY'
import json, sys
runs, out, rpc, slices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
parts = [json.load(open(f"{runs}/{index}/embedded-{rpc}.json")) for index in range(slices)]
merged = dict(parts[0], calls=[call for part in parts for call in part["calls"]])
merged["tasks"] = len(merged["calls"])
json.dump(merged, open(f"{out}/embedded-{rpc}.json", "w"), indent=1)
PY
  done
  summary "${@/#/$OUT/}"
}

# Per answers file (a build's folder or the file itself): calls answered,
# latency p50/p95 over all calls, mean attempts and completion tokens.
summary() {
  python3 - "$@" <<'PY'
import glob, json, os, statistics, sys
def percentile(values, share):
    ordered = sorted(values)
    return ordered[round((len(ordered) - 1) * share)]
print(f"{'answers':48} {'answered':>9} {'p50 ms':>8} {'p95 ms':>8} {'attempts':>9} {'tokens':>7}")
for path in sys.argv[1:]:
    files = [path] if path.endswith(".json") else sorted(glob.glob(os.path.join(path, "embedded-*.json")))
    for file in files:
        calls = json.load(open(file))["calls"]
        latencies = [call["meta"]["latency_ms"] for call in calls]
        answered = sum("answer" in call for call in calls)
        tokens = [call["meta"]["completion_tokens"] for call in calls if "completion_tokens" in call["meta"]]
        print(f"{file[-48:]:48} {answered:>4}/{len(calls):<4} {percentile(latencies, 0.5):8.0f} "
              f"{percentile(latencies, 0.95):8.0f} {statistics.mean(c['meta']['attempts'] for c in calls):9.2f} "
              f"{statistics.mean(tokens):7.0f}")
PY
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  receive) shift; receive "$@" ;;
  run) shift; run "$@" ;;
  summary) shift; summary "$@" ;;
  *) sed -n '2,28p' "$0" >&2; exit 2 ;;
esac
