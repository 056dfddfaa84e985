#!/usr/bin/env bash
# Makes sure the embedded engine can be compiled: llama-cpp-sys-2 builds
# llama.cpp with cmake and generates bindings with bindgen (libclang). Uses
# the machine's own tools when present; otherwise installs cmake and libclang
# from PyPI into a tool venv under the cache directory, without root.
# Writes $RIGGER_CACHE_DIR/build.env, which the Makefile sources before cargo.
set -euo pipefail

cache_dir="${RIGGER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rigger-inference}"
here="$(cd "$(dirname "$0")" && pwd)"
tools="$cache_dir/tools"
env_file="$cache_dir/build.env"
mkdir -p "$cache_dir"

if ! command -v c++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
  case "$(uname -s)" in
    Darwin) echo "setup: no C++ compiler; install one with: xcode-select --install" >&2 ;;
    *) echo "setup: no C++ compiler; install one with: sudo apt-get install -y build-essential" >&2 ;;
  esac
  exit 1
fi

has_libclang() { ls "$1"/libclang.so* "$1"/libclang.dylib >/dev/null 2>&1; }

system_libclang() {
  local dir
  for dir in ${LIBCLANG_PATH:-} "$(llvm-config --libdir 2>/dev/null)" /usr/lib/llvm-*/lib \
    /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu \
    /Library/Developer/CommandLineTools/usr/lib /opt/homebrew/opt/llvm/lib; do
    if [ -n "$dir" ] && has_libclang "$dir"; then echo "$dir"; return; fi
  done
}

path_prefix=""
libclang_dir="$(system_libclang || true)"
if ! command -v cmake >/dev/null 2>&1 || [ -z "$libclang_dir" ]; then
  wanted="$(sha256sum "$here/build-requirements.txt" 2>/dev/null || shasum -a 256 "$here/build-requirements.txt")"
  wanted="${wanted%% *}"
  if [ ! -x "$tools/bin/python" ] || [ "$(cat "$tools/.requirements.sha256" 2>/dev/null)" != "$wanted" ]; then
    echo "setup: installing cmake and libclang from PyPI into $tools" >&2
    "${PYTHON:-python3}" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/build-requirements.txt"
    echo "$wanted" > "$tools/.requirements.sha256"
  fi
  command -v cmake >/dev/null 2>&1 || path_prefix="$tools/bin"
  if [ -z "$libclang_dir" ]; then
    libclang_dir="$("$tools/bin/python" -c 'import clang, os; print(os.path.join(os.path.dirname(clang.__file__), "native"))')"
  fi
fi
# A shell that sourced build.env before finds our own cmake on its PATH;
# the file must still put it there for shells that did not.
if [ "$(command -v cmake 2>/dev/null)" = "$tools/bin/cmake" ]; then
  path_prefix="$tools/bin"
fi

# libclang from PyPI comes without clang's own headers (stddef.h, stdbool.h):
# point bindgen at the C compiler's.
extra_args="${BINDGEN_EXTRA_CLANG_ARGS:-}"
if [ -z "$extra_args" ] && command -v gcc >/dev/null 2>&1 && [ "$(uname -s)" != Darwin ]; then
  extra_args="-I$(gcc -print-file-name=include)"
fi

{
  [ -n "$path_prefix" ] && echo "export PATH=\"$path_prefix:\$PATH\""
  echo "export LIBCLANG_PATH=\"$libclang_dir\""
  echo "export BINDGEN_EXTRA_CLANG_ARGS=\"$extra_args\""
} > "$env_file"
echo "$env_file"
