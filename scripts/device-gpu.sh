#!/usr/bin/env bash
# GPU runs through the device tool (an NVIDIA H200 with CUDA's nvcc, CMake
# and ninja, but no Rust toolchain and no network): MLX on CUDA, the
# embedded engine's CUDA build, llama.cpp's server on CUDA, and the GPU
# bench over all of them (README, "Accelerators").
#
# What is built where:
# - here: our release binaries with `--features dynamic-backends` (ggml's
#   backends are libraries loaded at start, `--ggml-backend-dir`), their
#   llama.cpp libraries and CPU backends, the `gpu` bench binary, and the
#   pinned MLX wheels;
# - there: ggml's CUDA backend (libggml-cuda.so) from the same llama.cpp
#   sources the binary was built from (llama-cpp-sys-2's), which the binary
#   loads beside its CPU backends; and llama.cpp's `llama-server` with CUDA
#   from xllamacpp's sources (the llama.cpp the tests run on the CPU; the
#   crate ships llama.cpp without its server).
#
# Here:  scripts/device-gpu.sh pack
#          (CARGO_TARGET_DIR set as for any build here) writes
#          $CARGO_TARGET_DIR/gpu-device/: kit/ (this script, helpers, the
#          worker), src/ (the two llama.cpp source trees, 12 MB) and
#          p0/, p1/, ... (the payload in parts: a call carries at most
#          64 MiB, and the mlx-cuda-13 wheel alone is 90 MB). That is
#          target/gpu-device of the checkout the device tool sends
#          (ignored), so each call names what it needs in `carry`.
# There, in consecutive calls (the machine keeps /tmp for 30 s after one):
#   1. carry [.../kit, .../src, .../p0]: bash target/gpu-device/kit/device-gpu.sh receive
#        starts, in a new session that outlives the call, both CUDA builds
#        and the random-weight models (random_llama.py: 1b and 8b llamas
#        with SmolLM2's tokenizer, each a Hugging Face directory for MLX and
#        a bf16 GGUF from llama.cpp's converter; MODELS, default "1b 8b")
#   2. carry [.../kit, .../pN] for each further part, the last one with the
#      steps to run: `receive STEP...`. Once every part is there, `receive`
#      installs (into /tmp/rigger-gpu) and runs the steps in order:
#        built        waits for the builds and models (BUILD_WAIT s, default
#                     540) and puts libggml-cuda.so beside the CPU backends;
#                     BUILDS="sys" (of "sys server") builds only ggml's;
#                     also a lane's item
#        plan         starts the bench's lanes (PLAN below; LANES overrides)
#                     in a new session: each lane on a GPU of its own where
#                     the machine has as many, else one after the other
#        wait         waits for the lanes until CALL_LIMIT s (540) into the
#                     call and shows where they are; later calls carry
#                     kit/ alone and run `receive wait` until the lanes
#                     have ended
#        table        the bench's table of every result so far
#      The steps a lane runs, each as MODEL:STEP (MODEL `smol`, SmolLM2-135M-
#      Instruct Q4_1, carried; or `1b`, `8b`), also callable directly with
#      MODEL set:
#        embedded     the gateway on the embedded engine's CUDA build
#        llama-server llama.cpp's server directly, then through the gateway
#        mlx          the gateway on its MLX worker (MLX on CUDA)
#        mlx-server   mlx_lm.server directly, then through the gateway
#        embedded-tasks, mlx-tasks
#                     EnhanceTask and DecomposeTask at TASK_STREAMS (64)
#                     concurrent calls, and seeded answers at 16 and 64
#                     streams compared with the same prompts alone, on the
#                     real model only (random weights answer noise that the
#                     task rules refuse)
#      STREAMS (1,8,32,64) and TOKENS (128) shape the Generate load.
#      Old steps of the MLX stall investigation remain: repro, worker,
#      service, direct (MODEL=1b).
#   Results accumulate in /tmp/rigger-gpu/results and each call returns
#   them under $OUT (the JSON lines, the table, the logs' tails).
#   The run of 2026-12-01 (README, "The GPU bench"; 24 min of device
#   time), on a one-GPU machine: call 1 and the parts (6 s each), then
#   `SAME_AS_ALONE=0 receive plan wait table` (540 s), then `receive wait
#   table` until the lane had ended (300 s), then reruns of single items
#   with LANES="8b:llama-server" and so on.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# The first part travels with src/ (12 MB) and kit/, the others alone;
# with the working tree (4 MB) each call stays under 64 MiB.
FIRST_PART_MIB=42
PART_MIB=56
WHEELS=(mlx-cuda-13==0.32.4 mlx==0.32.4 mlx-lm==0.32.2 llguidance==1.9.1)
WORK=/tmp/rigger-gpu
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
CUDA_ARCH=90

pack() {
  local repo target dir stage cache_dir python
  repo="$(cd "$here/.." && pwd)"
  target="${CARGO_TARGET_DIR:-$repo/target}"
  dir="$target/gpu-device"
  cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
  python="$cache_dir/venv/bin/python"
  # shellcheck source=/dev/null
  source "$cache_dir/build.env"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' RETURN
  mkdir -p "$stage/wheels" "$stage/bin" "$stage/lib/backends" "$stage/models" "$stage/src"

  fetch_wheels "$repo/.device/wheels" "$python"
  cp "$repo"/.device/wheels/*.whl "$stage/wheels/"
  fetch_server_sources "$repo" "$python" "$stage/src"
  build_binaries "$repo" "$target" "$stage"

  cp "$cache_dir/models/$SMOL" "$stage/models/"

  rm -rf "$dir" && mkdir -p "$dir/kit/tokenizer" "$dir/src"
  # SmolLM2's tokenizer as our MLX worker converts it from the GGUF: the
  # random models' tokenizer, made on the device before the payload is there.
  "$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); import worker, pathlib; worker.convert_gguf(pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]))' \
    "$repo/src/backend/mlx" "$cache_dir/models/$SMOL" "$stage/smol-mlx"
  cp "$stage"/smol-mlx/tokenizer{,_config}.json "$dir/kit/tokenizer/"
  mv "$stage"/src/*.tar.xz "$dir/src/"
  # Compressed as a whole (the libraries shrink to a third): one call fewer.
  tar -C "$stage" -cf - wheels bin lib models | xz -T0 -6 >"$stage/payload.tar.xz"
  split_payload "$stage/payload.tar.xz" "$dir"
  sha256sum "$stage/payload.tar.xz" | cut -d' ' -f1 >"$dir/kit/payload.sha256"
  cp "$here/device-gpu.sh" "$here/mlx_cuda_probe.py" "$here/mlx_cuda_load.py" "$here/random_llama.py" "$dir/kit/"
  cp "$repo/src/backend/mlx/worker.py" "$dir/kit/"
  cp "$(ls -t "$target"/dyn/release/build/rigger-inference-*/out/rigger_inference_descriptor.bin | head -1)" \
    "$dir/kit/descriptors.bin"
  echo "binaries of $(git -C "$repo" describe --always --dirty); $(cat "$dir/kit/parts") parts:"
  du -sh "$dir"/*
}

fetch_wheels() {
  local into="$1" python="$2" spec
  mkdir -p "$into"
  for spec in "${WHEELS[@]}"; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$into" "$spec"
  done
}

# Two llama.cpp trees, without what no build here needs (docs, tests, the
# web UI's sources: the server is built without its UI):
# llama-cpp-sys-2's (the binary's ggml, so its CUDA backend matches) and
# xllamacpp's sdist at the pinned version (llama.cpp with its server).
fetch_server_sources() {
  local repo="$1" python="$2" out="$3" version sdist crate
  version="$(sed -n 's/^xllamacpp==//p' "$repo/scripts/requirements.txt")"
  sdist="$repo/.device/xllamacpp-$version.tar.gz"
  # From PyPI's simple index: its JSON API is not reachable from every
  # network that reaches the index.
  [ -f "$sdist" ] || "$python" - "$version" "$sdist" <<'EOF'
import re, sys, urllib.request
version, out = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/xllamacpp/").read().decode()
url = re.search(rf'href="([^"#]*/xllamacpp-{re.escape(version)}\.tar\.gz)', index).group(1)
urllib.request.urlretrieve(url, out)
EOF
  local unpacked
  unpacked="$(mktemp -d)"
  tar -C "$unpacked" -xzf "$sdist"
  tar -C "$unpacked"/xllamacpp-*/thirdparty -cJf "$out/llama-server.tar.xz" \
    --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/tests \
    --exclude=llama.cpp/tools/ui/src --exclude=llama.cpp/tools/ui/static --exclude=llama.cpp/.github llama.cpp
  rm -rf "$unpacked"
  crate="$(cargo metadata --format-version 1 --manifest-path "$repo/Cargo.toml" |
    "$python" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "llama-cpp-sys-2"))')"
  tar -C "$(dirname "$crate")" -cJf "$out/llama-sys.tar.xz" \
    --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/examples \
    --exclude=llama.cpp/tests --exclude=llama.cpp/pocs --exclude=llama.cpp/tools llama.cpp
}

# The service and its health probe with ggml's backends as libraries (a
# target directory of their own: the feature rebuilds llama.cpp), and the
# bench, each stripped.
build_binaries() {
  local repo="$1" target="$2" stage="$3" executable bin out
  for bin in rigger-inference rigger-health; do
    executable="$(cd "$repo" && CARGO_TARGET_DIR="$target/dyn" nice -n 10 cargo build --locked \
      --release --features dynamic-backends --bin "$bin" --message-format=json-render-diagnostics |
      sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)"
    [ -x "$executable" ] || { echo "no $bin executable built in $repo" >&2; exit 1; }
    strip -o "$stage/bin/$bin" "$executable"
  done
  python3 -c 'import sys; sys.exit(open(sys.argv[2], "rb").read() not in open(sys.argv[1], "rb").read())' \
    "$stage/bin/rigger-inference" "$repo/src/backend/mlx/worker.py" ||
    { echo "the binary does not embed this checkout's worker.py" >&2; exit 1; }
  out="$(dirname "$(ls -td "$target"/dyn/release/build/llama-cpp-sys-2-*/out/backends | head -1)")"
  cp -a "$out"/lib/*.so* "$stage/lib/"
  # Not the Sapphire Rapids variant: ggml picks it wherever cpuid lists AMX,
  # also where the kernel does not grant AMX's tile state (these sandboxed
  # machines: it dies of SIGILL at its first `tilezero`).
  find "$out/backends" -name 'libggml-cpu-*.so' ! -name '*sapphirerapids*' -exec cp {} "$stage/lib/backends/" \;
  # In the same target directory and with the same features: llama.cpp,
  # which the bench links without calling, is then built once.
  executable="$(cd "$repo" && CARGO_TARGET_DIR="$target/dyn" nice -n 10 cargo bench --locked \
    --features dynamic-backends --bench gpu --no-run 2>&1 |
    sed -n 's/.*Executable benches\/gpu.rs (\(.*\))$/\1/p' | tail -1)"
  [ -x "$repo/$executable" ] || [ -x "$executable" ] || { echo "no gpu bench built" >&2; exit 1; }
  strip -o "$stage/bin/gpu-bench" "$( [ -x "$executable" ] && echo "$executable" || echo "$repo/$executable")"
}

split_payload() {
  local payload="$1" dir="$2" index=1
  mkdir -p "$dir/p0"
  head -c "${FIRST_PART_MIB}M" "$payload" >"$dir/p0/part-00"
  tail -c "+$((FIRST_PART_MIB * 1024 * 1024 + 1))" "$payload" | split -b "${PART_MIB}m" -d -a 2 \
    --numeric-suffixes=1 - "$dir/part-"
  for part in "$dir"/part-*; do
    mkdir -p "$dir/p$index" && mv "$part" "$dir/p$index/"
    index=$((index + 1))
  done
  echo "$index" >"$dir/kit/parts"
}

# Keeps this call's parts in /tmp, starts the builds and the random models
# when the sources came along, installs once every part is there, then runs
# the steps asked for.
receive() {
  mkdir -p "$WORK/parts" "$WORK/results" "$WORK/logs" "$WORK/pids"
  local part
  for part in "$here"/../p*/part-*; do
    [ -e "$part" ] && cp "$part" "$WORK/parts/"
  done
  [ -d "$here/../src" ] && [ ! -e "$WORK/background-started" ] && start_background
  local have
  have="$(find "$WORK/parts" -name 'part-*' | wc -l)"
  echo "parts here: $have of $(cat "$here/parts")"
  [ "$have" -lt "$(cat "$here/parts")" ] && return 0
  install
  local step status=0
  for step in "$@"; do
    echo "=== $step ($(date +%T))"
    "step_${step//-/_}" || { status=$?; echo "step $step failed: $status"; }
  done
  publish
  return "$status"
}

install() {
  if [ ! -x "$WORK/bin/rigger-inference" ]; then
    cat "$WORK"/parts/part-* >"$WORK/payload.tar.xz"
    [ "$(sha256sum "$WORK/payload.tar.xz" | cut -d' ' -f1)" = "$(cat "$here/payload.sha256")" ] ||
      { echo "payload checksum differs: parts from another pack?" >&2; exit 1; }
    tar -C "$WORK" -xJf "$WORK/payload.tar.xz"
    rm "$WORK/payload.tar.xz"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "$WORK"/wheels/*.whl
    chmod +x "$WORK"/bin/*
  fi
  export PYTHONPATH="$WORK/site" PYTHONUNBUFFERED=1 LD_LIBRARY_PATH="$WORK/lib" HF_HUB_OFFLINE=1
  [ -n "${LANE:-}" ] && return 0
  python3 -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, mx.default_device())'
  nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
}

# What outlives a call runs from a copy of the kit: the next call replaces
# the carried one while bash still reads it. A changed kit gets a new copy.
kit_copy() {
  local copy
  copy="$WORK/kit-$(cat "$here"/*.sh "$here"/*.py | sha256sum | cut -c1-12)"
  [ -d "$copy" ] || { mkdir -p "$copy.tmp" && cp -r "$here"/. "$copy.tmp/" && mv "$copy.tmp" "$copy"; }
  echo "$copy"
}

# The CUDA builds and the random models, in a new session so that they
# outlive this call.
start_background() {
  mkdir -p "$WORK/src" "$WORK/models"
  tar -C "$WORK/src" -xJf "$here/../src/llama-sys.tar.xz" --transform 's,^llama.cpp,sys,'
  tar -C "$WORK/src" -xJf "$here/../src/llama-server.tar.xz" --transform 's,^llama.cpp,server,'
  touch "$WORK/background-started"
  setsid nohup bash "$(kit_copy)/device-gpu.sh" background >"$WORK/logs/background.log" 2>&1 </dev/null &
  echo "CUDA builds and models started: $(nvcc --version | tail -1), $(nproc) cores"
}

# The builds give way (nice) to whatever a lane benches meanwhile.
background() {
  nice -n 19 bash "$0" build &
  nice -n 19 bash "$0" models >"$WORK/logs/models.log" 2>&1 &
  wait
}

# ggml's CUDA backend as a loadable library, configured as llama-cpp-sys-2
# configures its `dynamic-backends` build; and llama-server with CUDA.
# Both at once, the cores split between them.
build() {
  local builds="${BUILDS:-sys server}" jobs
  jobs=$(($(nproc) / $(wc -w <<<"$builds")))
  [[ " $builds " == *" sys "* ]] && (
    cmake -S "$WORK/src/sys" -B "$WORK/build/sys" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_BACKEND_DL=ON -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
      -DGGML_CPU=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_COMMON=OFF &&
      cmake --build "$WORK/build/sys" --target ggml-cuda -j "$jobs" && touch "$WORK/built-sys"
  ) >"$WORK/logs/build-sys.log" 2>&1 &
  [[ " $builds " == *" server "* ]] && (
    cmake -S "$WORK/src/server" -B "$WORK/build/server" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF &&
      cmake --build "$WORK/build/server" --target llama-server -j "$jobs" && touch "$WORK/built-server"
  ) >"$WORK/logs/build-server.log" 2>&1 &
  wait
  echo "builds ended $(date +%T)"
}

# Random-weight llamas with SmolLM2's tokenizer (random_llama.py), each a
# Hugging Face directory for MLX and a bf16 GGUF converted from it by
# llama.cpp's converter (xllamacpp's tree: the crate ships the converter
# without the Python packages it imports).
step_models() {
  local shape
  for shape in ${MODELS:-1b 8b}; do
    [ -e "$WORK/made-$shape" ] && continue
    python3 "$here/random_llama.py" "$WORK/models/$shape" --tokenizer "$here/tokenizer" --shape "$shape" &&
      PYTHONPATH="$WORK/src/server/gguf-py" python3 "$WORK/src/server/convert_hf_to_gguf.py" \
        "$WORK/models/$shape" --outtype bf16 --outfile "$WORK/models/$shape.gguf" 2>&1 | tail -3 &&
      [ -s "$WORK/models/$shape.gguf" ] && touch "$WORK/made-$shape"
  done
  ls -la "$WORK"/models
}

# Waits for what start_background began (BUILD_WAIT s at most), then puts
# libggml-cuda.so beside the CPU backends (also when llama-server's build
# failed: the embedded engine needs only that).
step_built() {
  local waited=0 marker status=0
  until (for marker in ${BUILDS:-sys server}; do [ -e "$WORK/built-$marker" ] || exit 1; done
    for marker in ${MODELS:-1b 8b}; do [ -e "$WORK/made-$marker" ] || exit 1; done); do
    if ! pgrep -f "device-gpu.sh background" >/dev/null || [ "$waited" -ge "${BUILD_WAIT:-540}" ]; then
      tail -n 12 "$WORK"/logs/build-*.log "$WORK/logs/models.log"
      status=1
      break
    fi
    sleep 5
    waited=$((waited + 5))
  done
  echo "waited $waited s"
  [ -e "$WORK/built-sys" ] && cp "$(find "$WORK/build/sys" -name 'libggml-cuda.so' | head -1)" "$WORK/lib/backends/"
  ls -la "$WORK"/lib/backends/libggml-cuda.so "$WORK"/models
  return "$status"
}

server_binary() {
  find "$WORK/build/server" -type f -name llama-server | head -1
}

# A random model is made in the background from the first call; a step
# that needs one waits for it.
await_model() {
  [ "${MODEL:-smol}" = smol ] && return 0
  until [ -e "$WORK/made-$MODEL" ]; do
    pgrep -f "device-gpu.sh background" >/dev/null || { echo "no model $MODEL: see logs/models.log"; return 1; }
    sleep 5
  done
}

# The model of the engine steps: its GGUF (llama.cpp engines) and its MLX
# form (a directory, or the GGUF, which our MLX backend converts).
gguf_of() {
  case "${MODEL:-smol}" in
    smol) echo "$WORK/models/$SMOL" ;;
    *) echo "$WORK/models/$MODEL.gguf" ;;
  esac
}

mlx_of() {
  case "${MODEL:-smol}" in
    smol) echo "$WORK/models/$SMOL" ;;
    *) echo "$WORK/models/$MODEL" ;;
  esac
}

# mlx_lm.server needs a directory: the smol GGUF's conversion by `mlx`.
mlx_dir_of() {
  case "${MODEL:-smol}" in
    smol) find "$WORK/cache/mlx" -maxdepth 2 -name config.json -path "*SmolLM2*" -printf '%h\n' | head -1 ;;
    *) echo "$WORK/models/$MODEL" ;;
  esac
}

# Lanes run side by side on GPUs of their own, so each has its own ports
# (PORT + 100 × LANE), process files and logs.
port() {
  echo $(($1 + ${LANE:-0} * 100))
}

log_of() {
  echo "$WORK/logs/$1-${MODEL:-smol}-lane${LANE:-0}.log"
}

pid_of() {
  echo "$WORK/pids/$1.${LANE:-0}"
}

started() {
  local name="$1"
  shift
  # Appended: a later step starts the same process on the same model
  # (mlx, then mlx-tasks).
  "$@" >>"$(log_of "$name")" 2>&1 &
  echo $! >"$(pid_of "$name")"
}

# Waits until PROBE succeeds while the process NAME runs, READY_WAIT s at
# most; else shows its log's end and stops it.
until_ready() {
  local name="$1" begun=$SECONDS
  shift
  until "$@" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$(pid_of "$name")")" 2>/dev/null || [ $((SECONDS - begun)) -ge "${READY_WAIT:-420}" ]; then
      tail -20 "$(log_of "$name")"
      stop "$name"
      return 1
    fi
    sleep 1
  done
  echo "$name ready after $((SECONDS - begun)) s"
}

# Starts our service with the given settings on PORT and waits until its
# inference service is SERVING (a GPU worker warms up first).
serve() {
  local name="$1" port="$2"
  shift 2
  started "$name" env RIGGER_LISTEN="127.0.0.1:$port" RIGGER_METRICS_LISTEN=off RIGGER_CACHE_DIR="$WORK/cache" \
    RIGGER_TASK_CACHE_ENTRIES=0 RIGGER_MAX_IN_FLIGHT=256 RIGGER_MAX_QUEUE=512 RUST_LOG=info "$@" \
    "$WORK/bin/rigger-inference"
  until_ready "$name" "$WORK/bin/rigger-health" "127.0.0.1:$port" rigger.inference.v1.InferenceService
}

stop() {
  local pids
  pids="$(pid_of "$1")"
  [ -f "$pids" ] || return 0
  kill "$(cat "$pids")" 2>/dev/null || true
  wait "$(cat "$pids")" 2>/dev/null || true
  rm -f "$pids"
}

# An OpenAI-compatible runtime started by the step, ready once /v1/models answers.
runtime() {
  local name="$1" port="$2"
  shift 2
  started "$name" "$@"
  until_ready "$name" curl -sf "http://127.0.0.1:$port/v1/models"
}

# One engine's Generate load, labelled MODEL:LABEL (the table keeps one row
# per label and streams). Each label sends its own prompt set: a runtime
# benched directly and then through the gateway would otherwise answer the
# second run's prompts from its prompt cache.
bench() {
  local label="$1" set="$2"
  shift 2
  "$WORK/bin/gpu-bench" "$@" --streams "${STREAMS:-1,8,32,64}" --tokens "${TOKENS:-128}" --warm-up \
    --prompt-set "$set" --label "${MODEL:-smol}:$label" --json "$WORK/results/gpu-${MODEL:-smol}-lane${LANE:-0}.jsonl" ||
    echo "bench $label: exit $?"
}

tasks() {
  local engine="$1" port="$2" rpc
  for rpc in enhance decompose; do
    "$WORK/bin/gpu-bench" --grpc "127.0.0.1:$port" --rpc "$rpc" --streams "${TASK_STREAMS:-64}" \
      --label "$engine-$rpc" --json "$WORK/results/tasks-lane${LANE:-0}.jsonl" || echo "tasks $engine $rpc: exit $?"
  done
}

same_as_alone() {
  local engine="$1" port="$2"
  python3 "$here/mlx_cuda_load.py" "127.0.0.1:$port" "$here/descriptors.bin" --streams 16,64 --tokens 64 \
    >"$WORK/results/same-$engine.txt" 2>&1 || echo "same-as-alone $engine: exit $?"
  tail -3 "$WORK/results/same-$engine.txt"
}

# The embedded engine's settings for 64 concurrent streams on one GPU, and
# flash attention on, as llama-server has it on CUDA.
EMBEDDED=(INFERENCE_BACKEND=embedded RIGGER_PARALLEL=64 RIGGER_CTX_PER_SEQUENCE=4096 RIGGER_QUEUE=512
  RIGGER_FLASH_ATTENTION=true RIGGER_ON_TOPIC_SIMILARITY=0)

serve_embedded() {
  serve embedded "$(port 21161)" "${EMBEDDED[@]}" RIGGER_MODEL_PATH="$(gguf_of)" \
    RIGGER_GGML_BACKEND_DIR="$WORK/lib/backends" || return 1
  sed 's/\x1b\[[0-9;]*m//g' "$(log_of embedded)" |
    grep -i -E 'load_backend|device=' | cut -c1-240 | head -4
}

step_embedded() {
  await_model && serve_embedded || return 1
  bench embedded-gateway 1 --grpc "127.0.0.1:$(port 21161)"
  stop embedded
}

step_embedded_tasks() {
  serve_embedded || return 1
  tasks embedded "$(port 21161)"
  same_as_alone embedded "$(port 21161)"
  stop embedded
}

step_llama_server() {
  local direct
  direct="$(port 21171)"
  await_model || return 1
  # Its own libraries, not the embedded engine's (LD_LIBRARY_PATH would
  # win over the build's run path).
  runtime llama-server "$direct" env LD_LIBRARY_PATH="$(dirname "$(server_binary)")" "$(server_binary)" -m "$(gguf_of)" --host 127.0.0.1 --port "$direct" \
    -ngl 999 -np 64 -c $((64 * 4096)) -fa on || return 1
  bench llama-server-direct 2 --openai "http://127.0.0.1:$direct"
  serve llama-gateway "$(port 21162)" INFERENCE_BACKEND=openai OPENAI_BASE_URL="http://127.0.0.1:$direct/v1" ||
    { stop llama-server; return 1; }
  bench llama-server-gateway 3 --grpc "127.0.0.1:$(port 21162)"
  stop llama-gateway
  stop llama-server
}

serve_mlx() {
  serve mlx "$(port 21163)" INFERENCE_BACKEND=mlx MLX_PYTHON="$(command -v python3)" RIGGER_MLX_MODEL="$(mlx_of)" \
    RIGGER_MLX_BLAS=off RIGGER_MLX_MAX_BATCH=64 RIGGER_MLX_START_TIMEOUT=15m RIGGER_ON_TOPIC_SIMILARITY=0 ||
    return 1
  sed 's/\x1b\[[0-9;]*m//g' "$(log_of mlx)" |
    grep -i -E 'worker ready|warm-up' | cut -c1-240 | tail -3
}

step_mlx() {
  await_model && serve_mlx || return 1
  bench mlx-worker-gateway 4 --grpc "127.0.0.1:$(port 21163)"
  stop mlx
}

# After `mlx`, whose worker compiled the kernels this one's warm-up finds.
step_mlx_tasks() {
  serve_mlx || return 1
  tasks mlx "$(port 21163)"
  [ "${SAME_AS_ALONE:-1}" = 1 ] && same_as_alone mlx "$(port 21163)"
  stop mlx
}

step_mlx_server() {
  local dir direct
  dir="$(mlx_dir_of)"
  direct="$(port 21172)"
  [ -n "$dir" ] || { echo "no MLX directory for ${MODEL:-smol}: run the mlx step first"; return 1; }
  # The kernels our worker compiled, found by MLX in the same cache. An
  # existing Hugging Face cache: without one mlx_lm.server 0.32.2 answers
  # /v1/models with a 200 and an empty body (its cache scan raises after
  # the headers went out), which no client can read.
  mkdir -p "$WORK/hf-cache"
  HF_HUB_CACHE="$WORK/hf-cache" MLX_PTX_CACHE_DIR="$(ls -d "$WORK"/cache/mlx/ptx/* 2>/dev/null | head -1)" \
    runtime mlx-server "$direct" python3 -m mlx_lm.server --model "$dir" --host 127.0.0.1 --port "$direct" \
    --decode-concurrency 64 || return 1
  bench mlx_lm-direct 5 --openai "http://127.0.0.1:$direct"
  # mlx_lm.server listens with a backlog of 5 and closes each connection
  # after its answer, so 64 calls at once see SYNs dropped and retried
  # after 1 s and 3 s: past the gateway's default connect timeout (2 s).
  serve mlx-gateway "$(port 21164)" INFERENCE_BACKEND=openai OPENAI_BASE_URL="http://127.0.0.1:$direct/v1" \
    RIGGER_CONNECT_TIMEOUT=10s ||
    { stop mlx-server; return 1; }
  bench mlx_lm-gateway 6 --grpc "127.0.0.1:$(port 21164)"
  stop mlx-gateway
  stop mlx-server
}

# The bench's plan: lanes of MODEL:STEP items ('|' between lanes; an item
# without MODEL is smol's). Each lane runs on a GPU of its own: on two GPUs
# MLX runs beside llama.cpp, each engine alone on its GPU. On one GPU a
# single lane starts with MLX, whose speed hangs on a free core, while the
# CUDA builds finish at the lowest priority, and ends with the 8 B MLX
# runs, the slowest. In a new session: the plan outlives the call, and
# `wait` reports on it. LANES overrides both.
PLAN="built smol:embedded smol:llama-server 1b:embedded 1b:llama-server 8b:embedded 8b:llama-server smol:mlx-tasks"
PLAN+="|smol:mlx smol:mlx-server 1b:mlx 1b:mlx-server 8b:mlx 8b:mlx-server"
PLAN_ONE_GPU="smol:mlx smol:mlx-tasks smol:mlx-server 1b:mlx 1b:mlx-server built smol:embedded smol:llama-server"
PLAN_ONE_GPU+=" 1b:embedded 1b:llama-server 8b:embedded 8b:llama-server 8b:mlx 8b:mlx-server"

step_plan() {
  local gpus lanes index=0 lane kit
  gpus="$(nvidia-smi -L | wc -l)"
  if [ -n "${LANES:-}" ]; then
    IFS='|' read -r -a lanes <<<"$LANES"
  elif [ "$gpus" -ge 2 ]; then
    IFS='|' read -r -a lanes <<<"$PLAN"
  else
    lanes=("$PLAN_ONE_GPU")
  fi
  [ "$gpus" -lt "${#lanes[@]}" ] && lanes=("${lanes[*]}")
  kit="$(kit_copy)"
  rm -f "$WORK"/lane-*.done
  for lane in "${lanes[@]}"; do
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES="$index" LANE="$index" setsid nohup bash "$kit/device-gpu.sh" lane $lane \
      >"$WORK/logs/lane-$index.log" 2>&1 </dev/null &
    echo "lane $index on GPU $index: $lane"
    index=$((index + 1))
  done
  echo "$index" >"$WORK/lanes"
}

lane() {
  install
  local item status=0
  for item in "$@"; do
    echo "=== $item ($(date +%T))"
    [[ "$item" == *:* ]] || item="smol:$item"
    MODEL="${item%%:*}" "step_$(tr - _ <<<"${item#*:}")" || { status=$?; echo "$item failed: $status"; }
  done
  echo "=== lane ${LANE:-0} ended ($(date +%T))"
  touch "$WORK/lane-${LANE:-0}.done"
  return "$status"
}

# Waits for the plan's lanes until CALL_LIMIT s (default 540) after this
# call began, so that the call returns its results inside the device
# tool's 600 s, then shows where the lanes are.
step_wait() {
  local lanes
  lanes="$(cat "$WORK/lanes")"
  until [ "$(find "$WORK" -maxdepth 1 -name 'lane-*.done' | wc -l)" -ge "$lanes" ]; do
    [ "$SECONDS" -ge "${CALL_LIMIT:-540}" ] && { echo "lanes still running $SECONDS s into this call"; break; }
    sleep 5
  done
  grep -h -E '^=== |failed|ready after|exit' "$WORK"/logs/lane-*.log
}

step_table() {
  "$WORK/bin/gpu-bench" --table "$WORK"/results/*.jsonl |
    tee "$WORK/results/table.md" || true
}

# What comes back: the results and the logs' ends, under $OUT.
publish() {
  [ -n "${OUT:-}" ] || return 0
  local log
  mkdir -p "$WORK/tails"
  for log in "$WORK"/logs/*.log; do
    sed 's/\x1b\[[0-9;]*m//g' "$log" | tail -200 >"$WORK/tails/$(basename "$log")"
  done
  tar -C "$WORK" -czf "$OUT/results.tar.gz" results tails
}

# The old steps of the MLX stall investigation (README, "MLX on CUDA").
step_repro() {
  local model="$WORK/models/${MODEL:-1b}" logs="$WORK/logs" name pid second
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
      --tokens "${TOKENS:-64}" --worker "$here/worker.py" 2>"$WORK/logs/worker-$streams.log" || echo "exit $?"
    tail -3 "$WORK/logs/worker-$streams.log"
  done
}

step_service() {
  serve service 21151 INFERENCE_BACKEND=mlx MLX_PYTHON="$(command -v python3)" \
    RIGGER_MLX_MODEL="$WORK/models/${MODEL:-1b}" RIGGER_MLX_BLAS=off RIGGER_MLX_MAX_BATCH="${MAX_BATCH:-64}" \
    RIGGER_ON_TOPIC_SIMILARITY=0 RIGGER_MLX_START_TIMEOUT=15m || return 1
  python3 "$here/mlx_cuda_load.py" 127.0.0.1:21151 "$here/descriptors.bin" \
    --streams "${STREAMS:-1,4,16,64}" --tokens "${TOKENS:-128}" || echo "load exit $?"
  stop service
}

step_direct() {
  python3 "$here/mlx_cuda_load.py" --worker "$here/worker.py" \
    --model "$WORK/models/${MODEL:-1b}" --cache-dir "$WORK/cache/mlx" --max-batch "${MAX_BATCH:-64}" \
    --no-alone --streams "${STREAMS:-1,4,16,64}" --tokens "${TOKENS:-128}" 2>"$WORK/logs/direct.log" ||
    echo "direct exit $?"
}

case "${1:-}" in
  pack) shift; pack "$@" ;;
  receive) shift; receive "$@" ;;
  background) background ;;
  build) build ;;
  models) step_models ;;
  lane) shift; lane "$@" ;;
  *) sed -n "2,$(($(grep -n '^set -euo' "$0" | cut -d: -f1) - 1))p" "$0" >&2; exit 2 ;;
esac
