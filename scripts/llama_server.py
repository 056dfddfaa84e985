"""Runs llama.cpp's HTTP server (PyPI xllamacpp) on loopback until stdin closes.

Used by `make run` and by the tests as the real OpenAI-compatible runtime. It
prints one line `READY <port>` once /health answers, so callers never sleep.
Exiting on stdin EOF ties its lifetime to the parent: a test binary that dies
cannot leak a server.
"""

import argparse
import sys
import time
import urllib.request

import xllamacpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="path of a GGUF file")
    parser.add_argument("--alias", required=True, help="model name served in /v1/models")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    # One KV cache per slot: a request's greedy output then does not depend on
    # what else the server is decoding at the same time.
    params.kv_unified = False
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = [args.host]
    params.port = args.port
    server = xllamacpp.Server(params)

    health = f"http://{args.host}:{args.port}/health"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"llama.cpp server did not become healthy on {health}")
            time.sleep(0.05)
    print(f"READY {args.port}", flush=True)

    sys.stdin.read()
    del server


if __name__ == "__main__":
    main()
