"""Device-side helpers for MLX on CUDA (run by scripts/device-gpu.sh on the
accelerator machine; they also run on MLX's CPU build).

  model OUT --tokenizer DIR --shape {1b,8b,smol} [--bits N]
      A randomly initialised llama (random_llama.py's shapes) built with
      mlx-lm's own classes, with SmolLM2's tokenizer; --bits quantizes it as
      a GGUF import would be. The bench's unquantized models come from
      random_llama.py, which needs no MLX.
  batch MODEL --streams N [--tokens T] [--stagger K] [--seeded]
      A bare mlx-lm BatchGenerator loop: N prompts of different lengths,
      inserted at once (or one every K steps), greedy or seeded per-request
      samplers. Prints each step's time, so a stall shows which step and a
      compilation shows as one slow step; a watchdog prints every thread's
      stack when a step stalls.
  worker MODEL --streams N [--tokens T] [--worker PATH]
      Our worker (src/backend/mlx/worker.py) over its line protocol: starts
      it, waits for `ready`, sends N generate requests at once, reports when
      each ends and the answers (to compare with --streams 1).
"""

import argparse
import faulthandler
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from random_llama import SHAPES, config_for

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "List three uses of a paperclip.",
    "Explain, in two sentences, why the sky is blue, and then say what colour sunsets are and why.",
    "Translate 'good morning' into French.",
]
# A step slower than this is reported with every thread's stack.
STALL_SECONDS = 20


def prompt(index):
    base = PROMPTS[index % len(PROMPTS)]
    return base if index < len(PROMPTS) else f"{base} (variant {index})"


def build_model(args):
    import shutil

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((Path(args.tokenizer) / "tokenizer_config.json").read_text())
    vocab = len(json.loads((Path(args.tokenizer) / "tokenizer.json").read_text())["model"]["vocab"])
    config = config_for(args.shape, vocab)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    if args.bits:
        nn.quantize(model, group_size=32, bits=args.bits)
        config["quantization"] = {"group_size": 32, "bits": args.bits}
    mx.eval(model.parameters())
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.tokenizer) / name, out / name)
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"built {out}: {args.shape}, {parameters / 1e6:.0f} M stored values, eos {tokenizer.get('eos_token')}")


def watchdog():
    """Prints every thread's stack each time a step has run STALL_SECONDS."""
    faulthandler.dump_traceback_later(STALL_SECONDS, repeat=True, file=sys.stderr)


def batch_loop(args):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    print(f"mlx {mx.__version__}, device {mx.default_device()}", flush=True)
    model, tokenizer = load(args.model)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": prompt(i)}], add_generation_prompt=True)
        for i in range(args.streams)
    ]
    generator = BatchGenerator(
        model,
        stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        completion_batch_size=max(args.streams, 1),
        prefill_batch_size=max(args.streams, 1),
    )

    def sampler():
        if not args.seeded:
            return None
        key = [mx.random.key(7)]

        def draw(logprobs):
            key[0], k = mx.random.split(key[0])
            return mx.random.categorical(logprobs, key=k)

        return draw

    pending = list(range(args.streams))
    uid_of = {}
    answers = {}

    def insert(indices):
        uids = generator.insert(
            [prompts[i] for i in indices],
            max_tokens=[args.tokens] * len(indices),
            samplers=[sampler() for _ in indices] if args.seeded else None,
        )
        for i, uid in zip(indices, uids):
            uid_of[uid] = i
            answers[i] = []

    if args.stagger:
        insert([pending.pop(0)])
    else:
        insert(pending)
        pending = []
    started = time.perf_counter()
    step = 0
    finished = 0
    first_token = None
    watchdog()
    while finished < args.streams:
        if pending and args.stagger and step % args.stagger == 0 and step:
            insert([pending.pop(0)])
        tic = time.perf_counter()
        _, responses = generator.next()
        elapsed = time.perf_counter() - tic
        faulthandler.cancel_dump_traceback_later()
        watchdog()
        step += 1
        for response in responses:
            if first_token is None:
                first_token = time.perf_counter() - started
            if response.finish_reason != "stop":
                answers[uid_of[response.uid]].append(response.token)
            if response.finish_reason is not None:
                finished += 1
        if step <= 8 or step % 32 == 0 or elapsed > 1:
            print(f"step {step}: {elapsed * 1000:.1f} ms, {len(responses)} responses", flush=True)
    faulthandler.cancel_dump_traceback_later()
    wall = time.perf_counter() - started
    tokens = sum(len(a) for a in answers.values())
    print(json.dumps({
        "streams": args.streams, "seeded": args.seeded, "stagger": args.stagger, "wall_s": round(wall, 3),
        "first_token_s": round(first_token or 0, 3), "tokens": tokens, "tok_per_s": round(tokens / wall, 1),
        "answers": {i: tokenizer.decode(a)[:80] for i, a in sorted(answers.items())},
    }), flush=True)
    generator.close()


def worker_run(args):
    command = [sys.executable, args.worker, "--model", args.model, "--cache-dir", "/tmp/mlx-convert",
               "--max-batch", str(args.max_batch)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = json.loads(process.stdout.readline())
    print(f"ready after {time.perf_counter() - started:.1f} s: {ready}", flush=True)
    texts = {i: "" for i in range(args.streams)}
    ends = {}
    firsts = {}
    t0 = time.perf_counter()
    for i in range(args.streams):
        process.stdin.write(json.dumps({
            "op": "generate", "id": i, "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": args.tokens, "temperature": 0.7, "seed": 1000 + i, "stop": [], "json_schema": None,
        }) + "\n")
    process.stdin.flush()
    deadline = threading.Timer(args.timeout, process.kill)
    deadline.start()
    tokens = 0
    for line in process.stdout:
        reply = json.loads(line)
        rid = reply.get("id")
        if reply.get("event") == "text":
            firsts.setdefault(rid, time.perf_counter() - t0)
            texts[rid] += reply["text"]
        elif reply.get("event") in ("done", "error"):
            ends[rid] = time.perf_counter() - t0
            tokens += reply.get("generation_tokens", 0)
            if reply["event"] == "error":
                print(f"error {rid}: {reply['message']}", flush=True)
            if len(ends) == args.streams:
                break
    deadline.cancel()
    wall = time.perf_counter() - t0
    process.stdin.close()
    process.wait(timeout=30)
    print(json.dumps({
        "streams": args.streams, "completed": len(ends), "wall_s": round(wall, 3), "tokens": tokens,
        "tok_per_s": round(tokens / wall, 1), "ttft_first_s": round(min(firsts.values(), default=0), 3),
        "answers": {i: texts[i][:80] for i in sorted(texts)},
    }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model")
    model.add_argument("out")
    model.add_argument("--tokenizer", required=True)
    model.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    model.add_argument("--bits", type=int, default=0)
    batch = commands.add_parser("batch")
    batch.add_argument("model")
    batch.add_argument("--streams", type=int, default=4)
    batch.add_argument("--tokens", type=int, default=64)
    batch.add_argument("--stagger", type=int, default=0)
    batch.add_argument("--seeded", action="store_true")
    worker = commands.add_parser("worker")
    worker.add_argument("model")
    worker.add_argument("--streams", type=int, default=4)
    worker.add_argument("--tokens", type=int, default=64)
    worker.add_argument("--max-batch", type=int, default=4)
    worker.add_argument("--timeout", type=float, default=120)
    worker.add_argument("--worker", default=str(Path(__file__).resolve().parent / "worker.py"))
    args = parser.parse_args()
    {"model": build_model, "batch": batch_loop, "worker": worker_run}[args.command](args)


if __name__ == "__main__":
    main()
