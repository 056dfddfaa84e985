# The two commands of the README:
#   make run   sets up and starts the server on its default backend
#   make test  sets up and runs the whole test suite (what CI runs)
# and, while changing the code, make test-fast (seconds, no runtimes).
# Configuration comes from the environment (see README); nothing here
# overrides it.

SHELL := /bin/bash
export RIGGER_CACHE_DIR ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/rigger-inference
# cmake and libclang for llama.cpp's build, from scripts/setup-build.sh.
CARGO := source "$(RIGGER_CACHE_DIR)/build.env" && cargo
# Cargo with clippy-driver as the compiler of this crate (what `cargo clippy`
# does, but in build mode): lints and test binaries come from one
# compilation. A `cargo clippy` pass (check mode) builds the dependencies'
# build scripts apart from a test build's, so llama.cpp would be compiled
# twice; CLIPPY_ARGS is how cargo-clippy hands its flags to the driver.
CARGO_LINTED := source "$(RIGGER_CACHE_DIR)/build.env" \
	&& RUSTC_WORKSPACE_WRAPPER="$$(rustc --print sysroot)/bin/clippy-driver" \
	CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__" cargo

.PHONY: run test test-fast setup lint bench bench-kit bench-mlx bench-meaning bench-models bench-instances eval fuzz

setup:
	scripts/setup-python.sh >/dev/null
	scripts/setup-build.sh >/dev/null

# The embedded engine's accelerator for `make run`: cuda, vulkan, metal or
# cpu. Unset: cuda when nvcc is on PATH, else none. macOS needs nothing:
# ggml builds Metal in there by itself. `make test` stays on the CPU build.
RIGGER_ACCEL ?= $(if $(shell command -v nvcc 2>/dev/null),cuda,cpu)
ACCELERATORS := cuda vulkan metal
ACCEL_FEATURES := $(if $(filter $(ACCELERATORS),$(RIGGER_ACCEL)),--features $(RIGGER_ACCEL))

run: setup
	@case "$(RIGGER_ACCEL)" in cpu|cuda|vulkan|metal) ;; \
	  *) echo "RIGGER_ACCEL=$(RIGGER_ACCEL): use cpu, cuda, vulkan or metal" >&2; exit 2;; esac
	$(CARGO) build --release --locked $(ACCEL_FEATURES)
	exec target/release/rigger-inference

# Without --all-targets too: the service alone, without the features that
# dev-dependencies switch on, must build (what `make run` compiles).
lint: setup
	cargo fmt --all -- --check
	$(CARGO) clippy --locked -- -D warnings
	$(CARGO) clippy --locked --all-targets -- -D warnings

# One compilation for lints and tests (see CARGO_LINTED). The service alone
# is built first, without the features dev-dependencies switch on: what
# `make run` compiles must build by itself.
test: setup
	cargo fmt --all -- --check
	$(CARGO_LINTED) build --locked --bins
	$(CARGO_LINTED) test --locked --all-targets --no-run
	$(CARGO_LINTED) test --locked --lib --bins --tests

# The fast tier: the unit tests and tests/fast/ (the whole service over
# scripted in-process backends). No Python, model or runtime process, so
# only the build setup is needed. Compiled as `make test` compiles (lints
# included), so switching between the two rebuilds nothing.
test-fast:
	scripts/setup-build.sh >/dev/null
	$(CARGO_LINTED) test --locked --lib --test fast

# Every benchmark, one after another (about 15 minutes): the kit (gateway
# overhead, relay, scaling, memory; writes benches/results/), the embedded
# engine vs llama.cpp's server, and the MLX worker.
bench: setup
	$(CARGO) bench --locked --bench kit
	$(CARGO) bench --locked --bench inference
	$(CARGO) bench --locked --bench mlx

bench-meaning: setup
	$(CARGO) bench --locked --bench meaning

# Many models on one service: loads, evictions, a stream while another
# model loads, memory, a three-model pipeline (BENCH_PIPELINE_TASKS tasks).
bench-models: setup
	$(CARGO) bench --locked --bench models

bench-instances: setup
	$(CARGO) bench --locked --bench instances

bench-kit: setup
	$(CARGO) bench --locked --bench kit

bench-mlx: setup
	$(CARGO) bench --locked --bench mlx

# Options after `--`, e.g. make eval EVAL_ARGS="--backends embedded --limit 10";
# MEANING_ARGS go to the judge of meaning (e.g. "--verbose"). The judge needs
# WordLlama (scripts/eval-requirements.txt), installed here only: CI never
# runs the eval.
EVAL_PYTHON := $(RIGGER_CACHE_DIR)/venv/bin/python
eval: setup
	$(EVAL_PYTHON) -m pip install --quiet --disable-pip-version-check -r scripts/eval-requirements.txt
	$(CARGO) bench --locked --bench eval -- $(EVAL_ARGS)
	$(EVAL_PYTHON) scripts/eval_meaning.py $(MEANING_ARGS)

# Every fuzz target under libFuzzer for FUZZ_SECONDS each. Needs a nightly
# toolchain (cargo-fuzz instruments with -Zsanitizer); installs cargo-fuzz
# into the cache directory. CI runs the same properties on stable (src/fuzzing.rs).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := request_validation structured_output wire_framing
fuzz: setup
	test -x "$(RIGGER_CACHE_DIR)/tools/bin/cargo-fuzz" || $(CARGO) install cargo-fuzz --locked --root "$(RIGGER_CACHE_DIR)/tools"
	export PATH="$(RIGGER_CACHE_DIR)/tools/bin:$$PATH"; cd fuzz && for target in $(FUZZ_TARGETS); do \
	  $(CARGO) +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
