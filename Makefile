# The two commands of the README:
#   make run   sets up and starts the server on its default backend
#   make test  sets up and runs the whole test suite (what CI runs)
# Configuration comes from the environment (see README); nothing here
# overrides it.

SHELL := /bin/bash
export RIGGER_CACHE_DIR ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/rigger-inference

.PHONY: run test setup lint

setup:
	scripts/setup-python.sh >/dev/null

run: setup
	scripts/run.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings

test: setup lint
	cargo test --locked --all-targets
