#!/usr/bin/env bash
# Starts rigger-inference on its default backend (`make run`).
#
# Settings come from the environment (RIGGER_LISTEN, INFERENCE_BACKEND,
# OLLAMA_HOST, OPENAI_BASE_URL, RIGGER_MODEL, ...); this script never passes a
# flag that would override them. When no OpenAI-compatible server is
# configured and Ollama is not chosen, it starts llama.cpp's server (PyPI
# xllamacpp) with the cached default model on loopback and points
# OPENAI_BASE_URL at it; that server lives exactly as long as rigger-inference.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache_dir="$("$root/scripts/setup-python.sh" | tail -n 1)"

cargo build --release --locked --manifest-path "$root/Cargo.toml"

backend="$(echo "${INFERENCE_BACKEND:-auto}" | tr '[:upper:]' '[:lower:]')"
if [ -z "${OPENAI_BASE_URL:-}" ] && [ "$backend" != ollama ]; then
  port="${RIGGER_LLAMA_PORT:-8088}"
  cores="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
  # Half the cores: llama.cpp's busy-waiting threads starve everything else
  # (this service included) when they take all of them.
  threads="${RIGGER_LLAMA_THREADS:-$(( cores > 1 ? cores / 2 : 1 ))}"
  ready="$(mktemp -u)"
  mkfifo "$ready"
  # fd 3 is the llama server's stdin; rigger-inference inherits it through
  # exec, so the llama server exits when rigger-inference does.
  exec 3> >(exec "$cache_dir/venv/bin/python" "$root/scripts/llama_server.py" \
    --model "$cache_dir/models/SmolLM2-135M-Instruct.Q4_1.gguf" \
    --alias smollm2-135m-instruct --host 127.0.0.1 --port "$port" \
    --threads "$threads" --parallel 4 --ctx 8192 >"$ready")
  read -r status <"$ready"
  rm -f "$ready"
  if [ "$status" != "READY $port" ]; then
    echo "run: llama.cpp server did not start on 127.0.0.1:$port" >&2
    exit 1
  fi
  echo "run: llama.cpp server (SmolLM2-135M-Instruct) on http://127.0.0.1:$port/v1" >&2
  export OPENAI_BASE_URL="http://127.0.0.1:$port/v1"
fi

exec "$root/target/release/rigger-inference"
