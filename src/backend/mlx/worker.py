"""rigger-inference's MLX worker: loads one mlx-lm model once and serves
generations over line-delimited JSON on stdin/stdout until stdin closes.

Requests (one JSON object per line on stdin):
  {"op": "generate", "id": N, "messages": [{"role", "content"}], "max_tokens",
   "temperature", "top_p", "seed", "frequency_penalty", "stop": [...],
   "json_schema": {...} | null, "no_repeat": {"ngram", "already_said": [...]}}
  {"op": "cancel", "id": N}
  {"op": "pause", "id": N}    (the caller is behind: leave the batch, keep the KV cache)
  {"op": "resume", "id": N}   (the caller caught up: rejoin the batch where it left)
Replies (one JSON object per line on stdout):
  {"event": "ready", "model", "device", "fast_path", "load_seconds", "max_batch",
   "compute": {"kind": "cpu" | "metal" | "cuda" | "gpu", "name", "memory_total"},
   "active_memory"}
  {"id": N, "event": "text", "text"}
  {"id": N, "event": "done", "finish_reason": "stop" | "length", "prompt_tokens",
   "cached_tokens", "generation_tokens", "prompt_tps", "generation_tps",
   "prompt_seconds", "generation_seconds", "peak_memory", "active_memory"}
  {"id": N, "event": "error", "message"}
  {"event": "fatal", "message"}   (then the worker exits)

Prompts are data: nothing a request carries is ever evaluated. Concurrent
requests are decoded together by mlx-lm's BatchGenerator, which one thread
(this module's main loop) owns; a reader thread feeds it. A GGUF model is
converted once into an mlx-lm directory under --cache-dir.

On a GPU the worker warms up before it says `ready`: MLX's CUDA backend
compiles a kernel (NVRTC) the first time it meets a new kernel variant, and
the generation thread does nothing else meanwhile, every stream of the batch
waiting with the GPU idle: on an H200, 44-80 s for each row tile of a 4-bit
model's quantized matmul, 2-7 s for each new batch shape of a bf16 one. Warm-up runs requests through the batch shapes, samplers
and processors serving uses, so those compilations happen before readiness;
the compiled kernels are kept under --cache-dir, so only a machine's first
worker pays for them.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

PROTOCOL = None  # the real stdout; sys.stdout is pointed at stderr
MODEL_KEY = "model"  # one model per worker: the prompt cache's only key

# Warm-up prompts read alone, in tokens. A prompt of n tokens is read as a
# prefill of n - 1 rows (its last token starts generation), and MLX's CUDA
# backend compiles the quantized matmul once per row tile: under 8 rows it
# takes the vector kernel, up to 16, 32 and beyond them (64) a tile each.
# The longest prompt is read in --prefill-step chunks and decodes past
# ATTENTION_SWITCH keys, from where MLX's CUDA attention uses cuDNN.
WARM_UP_PROMPT_TOKENS = (5, 9, 25, 49)
ATTENTION_SWITCH = 256
WARM_UP_TEXT = "warm up "
# Every sampler and processor a request can ask for.
WARM_UP_SAMPLING = (
    {"temperature": 0},
    {"temperature": 0.7, "top_p": 0.9, "seed": 1},
    {"temperature": 0, "frequency_penalty": 0.5},
    {"temperature": 0, "no_repeat": {"ngram": 3, "already_said": ["warm up"]}},
    {"temperature": 0, "json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
)
WARM_UP_TOKENS = 2


def emit(message):
    PROTOCOL.write(json.dumps(message, ensure_ascii=False) + "\n")
    PROTOCOL.flush()


def log(text):
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- GGUF import

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GROUP_SIZE = 32


def scalar(value):
    return value.item() if hasattr(value, "item") else value


def hf_name(gguf_name):
    base, _, part = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[kind]}", part
    return TOP_NAMES[base], part


def unpermute(rows, heads):
    """Undoes llama.cpp's per-head interleaving of q/k projection rows."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def convert_gguf(gguf, out):
    import mlx.core as mx
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    weights, meta = mx.load(str(gguf), return_metadata=True)
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"GGUF import supports llama-architecture models, not {arch!r}")
    heads = int(scalar(meta["llama.attention.head_count"]))
    kv_heads = int(scalar(meta.get("llama.attention.head_count_kv", heads)))
    converted, quantization = {}, {"group_size": GROUP_SIZE}
    layer_bits = {}
    for name, tensor in weights.items():
        module, part = hf_name(name)
        if name.startswith("blk.") and (".attn_q." in name or ".attn_k." in name):
            tensor = unpermute(tensor, heads if ".attn_q." in name else kv_heads)
        converted[f"{module}.{part}"] = tensor
        if part == "scales":
            packed = weights[name.rsplit(".", 1)[0] + ".weight"]
            layer_bits[module] = packed.shape[1] * 32 // (tensor.shape[1] * GROUP_SIZE)
    bits = sorted(set(layer_bits.values()))
    if bits:
        common = max(bits, key=list(layer_bits.values()).count)
        quantization["bits"] = common
        for module, module_bits in layer_bits.items():
            if module_bits != common:
                quantization[module] = {"group_size": GROUP_SIZE, "bits": module_bits}
    config = {
        "model_type": "llama",
        "hidden_size": int(scalar(meta["llama.embedding_length"])),
        "num_hidden_layers": int(scalar(meta["llama.block_count"])),
        "intermediate_size": int(scalar(meta["llama.feed_forward_length"])),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(scalar(meta["llama.attention.layer_norm_rms_epsilon"])),
        "rope_theta": float(scalar(meta.get("llama.rope.freq_base", 10000.0))),
        "max_position_embeddings": int(scalar(meta.get("llama.context_length", 2048))),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in weights,
        "eos_token_id": int(scalar(meta["tokenizer.ggml.eos_token_id"])),
    }
    if bits:
        config["quantization"] = quantization

    tokens = meta["tokenizer.ggml.tokens"]
    types = [int(t) for t in meta["tokenizer.ggml.token_type"].tolist()]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if meta.get("tokenizer.ggml.pre") == "smollm":
        splitters.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    tokenizer.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
    tokenizer.add_special_tokens(control)
    name_of = lambda key: tokens[int(scalar(meta[key]))] if key in meta else None
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of("tokenizer.ggml.bos_token_id"),
        "eos_token": name_of("tokenizer.ggml.eos_token_id"),
        "unk_token": name_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": name_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(scalar(meta.get("tokenizer.ggml.add_bos_token", False))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]

    # Written aside and renamed into place, so a conversion that another
    # worker runs at the same time, or one that was interrupted, never
    # leaves a half-written model behind.
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(partial / "model.safetensors"), converted, metadata={"format": "mlx"})
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(partial / "tokenizer.json"))
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    try:
        partial.rename(out)
    except OSError:
        if not out.is_dir():
            raise
        import shutil

        shutil.rmtree(partial, ignore_errors=True)


def model_directory(model, cache_dir):
    """The mlx-lm directory of --model: itself, or a GGUF's cached conversion."""
    path = Path(model).expanduser()
    if (path / "snapshots").is_dir():
        # A Hugging Face cache entry (models--org--name): the snapshot
        # refs/main names, else the newest.
        ref = path / "refs" / "main"
        if ref.is_file():
            return path / "snapshots" / ref.read_text().strip()
        snapshots = sorted((path / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        if not snapshots:
            raise FileNotFoundError(f"no snapshot in {path}")
        return snapshots[-1]
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"no model at {path}")
    digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"{path.stem}-{digest}"
    if not out.is_dir():
        log(f"converting {path} to an MLX model in {out}")
        convert_gguf(path, out)
    return out


# ---------------------------------------------------------------- generation


class Request:
    """One generation in the batch: its sampling, constraint, text and counts."""

    def __init__(self, rid, message, tokenizer, lltokenizer, prompt=None):
        self.id = rid
        self.stop = [s for s in message.get("stop") or [] if s]
        self.max_tokens = int(message["max_tokens"])
        self.detokenizer = tokenizer.detokenizer
        # `prompt` (token ids) only from the warm-up, which needs exact lengths.
        if prompt is None:
            prompt = tokenizer.apply_chat_template(message["messages"], add_generation_prompt=True)
        self.prompt = prompt
        self.started = time.perf_counter()
        self.first_token = None
        self.generated = 0
        self.sent = 0  # characters of the text already emitted
        self.text = ""
        self.matcher = None
        self.cached = 0  # prompt tokens taken from the prompt cache
        self.resume_from = None  # while paused: its KV cache and tokens
        schema = message.get("json_schema")
        if schema is not None:
            import llguidance

            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
            tokenizer_for_grammar = lltokenizer()
            self.matcher = llguidance.LLMatcher(tokenizer_for_grammar, grammar)
            error = self.matcher.get_error()
            if error:
                raise ValueError(f"json_schema cannot be enforced: {error}")
        self.sampler = make_sampler(message.get("temperature"), message.get("top_p"), message.get("seed"))
        # Processors see the prompt and the tokens generated so far.
        self.processors = []
        penalty = message.get("frequency_penalty")
        if penalty:
            self.processors.append(frequency_penalty(float(penalty), len(self.prompt)))
        if self.matcher is not None:
            self.processors.append(
                constrain(self.matcher, tokenizer_for_grammar.vocab_size, len(self.prompt))
            )
        rule = message.get("no_repeat")
        if rule:
            # After the schema's mask: the ban gives way when only banned
            # tokens are left.
            said = [tokenizer.encode(text, add_special_tokens=False) for text in rule.get("already_said") or []]
            self.processors.append(no_repeat(int(rule["ngram"]), said, len(self.prompt)))


def make_sampler(temperature, top_p, seed):
    return Sampler(temperature, top_p, seed)


class Sampler:
    """Greedy at temperature 0; otherwise temperature and nucleus sampling
    from a key of this request's own, so a seed gives the same answer
    batched or alone, paused or not."""

    def __init__(self, temperature, top_p, seed):
        import mlx.core as mx

        self.greedy = temperature is not None and temperature <= 0
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.top_p = top_p
        self.key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        self.previous_key = self.key

    def __call__(self, logprobs):
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_top_p

        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        if self.top_p is not None and 0 < self.top_p < 1:
            logprobs = apply_top_p(logprobs, float(self.top_p))
        self.previous_key = self.key
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1.0 / self.temperature), key=key)

    def rewind(self):
        """Forgets the last draw: mlx-lm samples one token ahead, and a
        paused request draws that token again when it resumes."""
        self.key = self.previous_key


def frequency_penalty(penalty, prompt_length):
    """OpenAI's frequency penalty: each generated occurrence of a token
    lowers its logit by `penalty` (the prompt does not count)."""

    def process(tokens, logits):
        generated = tokens[prompt_length:]
        if generated.size:
            logits = logits.at[:, generated].subtract(penalty)
        return logits

    return process


def no_repeat(ngram, said, prompt_length):
    """The embedded engine's n-gram ban: avoid a token that would repeat an
    n-gram of the answer or complete one of the `said` token sequences,
    whenever another token is allowed."""
    import mlx.core as mx

    n = max(ngram, 2)
    said = [list(tokens) for tokens in said if len(tokens) >= 2]

    def process(tokens, logits):
        history = (tokens.tolist() if hasattr(tokens, "tolist") else list(tokens))[prompt_length:]
        banned = {
            sequence[-1]
            for sequence in said
            if len(history) >= len(sequence) - 1 and history[len(history) - len(sequence) + 1:] == sequence[:-1]
        }
        if len(history) >= n:
            tail = history[len(history) - n + 1:]
            banned.update(history[i + n - 1] for i in range(len(history) - n + 1) if history[i:i + n - 1] == tail)
        if not banned:
            return logits
        masked = logits.at[:, mx.array(sorted(banned))].minimum(-float("inf"))
        if mx.max(masked).item() == -float("inf"):
            return logits
        return masked

    return process


def constrain(matcher, grammar_vocab, prompt_length):
    """A logits processor that keeps only tokens the JSON Schema allows."""
    import llguidance.numpy
    import mlx.core as mx
    import numpy as np

    state = {"consumed": prompt_length, "mask": None}

    def process(tokens, logits):
        generated = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        for token in generated[state["consumed"]:]:
            matcher.consume_token(int(token))
        state["consumed"] = len(generated)
        vocab = logits.shape[-1]
        if state["mask"] is None:
            state["mask"] = llguidance.numpy.allocate_token_bitmask(1, grammar_vocab)
        llguidance.numpy.fill_next_token_bitmask(matcher, state["mask"], 0)
        bits = np.unpackbits(state["mask"].view(np.uint8), bitorder="little")
        # The model's vocabulary may be padded beyond the tokenizer's.
        bits = np.pad(bits, (0, max(0, vocab - bits.size)))[:vocab]
        allowed = mx.array(bits.astype(bool)).reshape(1, vocab)
        return mx.where(allowed, logits, -float("inf"))

    return process


class Worker:
    def __init__(self, args):
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator

        started = time.perf_counter()
        directory = model_directory(args.model, args.cache_dir)
        self.model, self.tokenizer = load(str(directory))
        fast_path = args.dequantize
        if fast_path:
            from mlx_lm.utils import dequantize_model

            self.model = dequantize_model(self.model)
            self.model.set_dtype(mx.float32)
            mx.eval(self.model.parameters())
        self.lltok = None
        stop_tokens = [[token] for token in sorted(self.tokenizer.eos_token_ids)]
        self.batch = BatchGenerator(
            self.model,
            stop_tokens=stop_tokens,
            completion_batch_size=args.max_batch,
            prefill_batch_size=args.max_batch,
            prefill_step_size=args.prefill_step,
        )
        self.prompt_cache_size = args.prompt_cache
        self.prompt_cache = self.fresh_prompt_cache()
        self.requests = {}  # BatchGenerator uid -> Request
        self.uids = {}  # request id -> uid
        self.paused = {}  # request id -> Request, out of the batch
        self.send = emit
        if args.warm_up == "on" or (args.warm_up == "auto" and mx.default_device().type == mx.gpu):
            self.warm_up(args.max_batch, args.prefill_step)
        self.send({
            "event": "ready",
            "model": args.name or directory.name,
            "device": str(mx.default_device()),
            "fast_path": fast_path,
            "load_seconds": round(time.perf_counter() - started, 3),
            "max_batch": args.max_batch,
            "compute": compute_device(),
            "active_memory": mx.get_active_memory(),
        })

    def fresh_prompt_cache(self):
        from mlx_lm.models.cache import LRUPromptCache

        return LRUPromptCache(max_size=self.prompt_cache_size)

    def warm_up(self, max_batch, prefill_step):
        """Generates a few tokens for made-up requests, their replies kept
        here: a full batch of chat requests with every kind of sampling
        (even past --max-batch) whose requests end one step apart, so the
        batch passes through every size; then prompts of each prefill tile's
        length alone; then a chat request and a follow-up that reuses its
        cached prefix. Leaves no cached prompt behind."""
        started = time.perf_counter()
        replies = []

        def chat(rid, sampling, max_tokens, turns=1):
            # Prompts of a few lengths, so the batch pads them.
            content = WARM_UP_TEXT * (rid % len(WARM_UP_PROMPT_TOKENS) + 1)
            return {"op": "generate", "id": rid, "messages": [{"role": "user", "content": content}] * turns,
                    "max_tokens": max_tokens, "stop": [], "json_schema": None, **sampling}

        def alone(rid, length):
            tokens = self.tokenizer.encode(WARM_UP_TEXT * length, add_special_tokens=False)[:length]
            message = chat(rid, WARM_UP_SAMPLING[0], WARM_UP_TOKENS)
            return lambda: self.start(Request(rid, message, self.tokenizer, self.lltokenizer, prompt=tokens))

        together = [
            chat(-1 - i, WARM_UP_SAMPLING[i % len(WARM_UP_SAMPLING)], WARM_UP_TOKENS + i)
            for i in range(max(max_batch, len(WARM_UP_SAMPLING)))
        ]
        lengths = (*WARM_UP_PROMPT_TOKENS, max(2 * prefill_step, ATTENTION_SWITCH) + 1)
        # (starts, whether it may reuse the prompts before it)
        waves = [
            ([lambda message=message: self.handle(message) for message in together], False),
            *(([alone(-1000 - i, length)], False) for i, length in enumerate(lengths)),
            ([lambda: self.handle(chat(-2000, WARM_UP_SAMPLING[0], WARM_UP_TOKENS))], False),
            ([lambda: self.handle(chat(-2000, WARM_UP_SAMPLING[0], WARM_UP_TOKENS, turns=2))], True),
        ]
        self.send = replies.append
        try:
            for starts, reuse in waves:
                if not reuse:
                    self.prompt_cache = self.fresh_prompt_cache()
                for begin in starts:
                    begin()
                while self.busy():
                    self.step()
        finally:
            self.send = emit
            self.prompt_cache = self.fresh_prompt_cache()
        failures = [reply["message"] for reply in replies if reply.get("event") == "error"]
        done = sum(1 for reply in replies if reply.get("event") == "done")
        log(f"warm-up: {done} requests in {time.perf_counter() - started:.1f} s"
            + (f"; {len(failures)} failed, first: {failures[0]}" if failures else ""))

    def reusable_prefix(self, prompt):
        """A copy of the KV cache of the longest prompt prefix seen before
        (the task prompts' fixed instructions and example, earlier turns),
        and the prompt tokens still to read (at least one)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self.prompt_cache.fetch_nearest_cache(MODEL_KEY, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def lltokenizer(self):
        if self.lltok is None:
            import llguidance.hf

            eos = min(self.tokenizer.eos_token_ids)
            self.lltok = llguidance.hf.from_tokenizer(self.tokenizer._tokenizer, eos_token=eos)
        return self.lltok

    def handle(self, message):
        op = message.get("op")
        rid = message.get("id")
        if op == "cancel":
            uid = self.uids.pop(rid, None)
            if uid is not None:
                self.batch.remove([uid])
                self.requests.pop(uid, None)
            self.paused.pop(rid, None)
            return
        if op == "pause":
            self.pause(rid)
            return
        if op == "resume":
            self.resume(rid)
            return
        if op != "generate":
            self.send({"id": rid, "event": "error", "message": f"unknown op {op!r}"})
            return
        try:
            self.start(Request(rid, message, self.tokenizer, self.lltokenizer))
        except Exception as error:  # a bad request must not end the worker
            self.send({"id": rid, "event": "error", "invalid_request": True, "message": f"{type(error).__name__}: {error}"})

    def start(self, request):
        """Puts a request into the batch after the longest cached prefix of
        its prompt."""
        cache, rest = self.reusable_prefix(request.prompt)
        request.cached = len(request.prompt) - len(rest)
        (uid,) = self.batch.insert(
            [rest],
            max_tokens=[request.max_tokens],
            caches=[cache],
            all_tokens=[request.prompt[: request.cached]],
            samplers=[request.sampler],
            logits_processors=[request.processors],
        )
        self.requests[uid] = request
        self.uids[request.id] = uid

    def pause(self, rid):
        """Takes a generating request out of the batch with its KV cache,
        while its caller reads more slowly than it is generated."""
        from mlx_lm.models.cache import can_trim_prompt_cache

        uid = self.uids.get(rid)
        request = self.requests.get(uid)
        # Only a request that is generating (it has sent text) is paused;
        # one that already ended has nothing left to pause.
        if request is None or request.first_token is None:
            return
        cache, tokens = self.batch.extract_cache([uid])[uid]
        if not can_trim_prompt_cache(cache):
            return  # it could not rejoin where it left: let it run
        self.batch.remove([uid])
        request.sampler.rewind()
        request.resume_from = (cache, list(tokens))
        del self.requests[uid]
        del self.uids[rid]
        self.paused[rid] = request

    def resume(self, rid):
        """Puts a paused request back into the batch: the cache loses its
        last token, which is read again to draw the next one."""
        from mlx_lm.models.cache import trim_prompt_cache

        request = self.paused.pop(rid, None)
        if request is None:
            return
        cache, tokens = request.resume_from
        request.resume_from = None
        trim_prompt_cache(cache, 1)
        (uid,) = self.batch.insert(
            [tokens[-1:]],
            max_tokens=[request.max_tokens - request.generated],
            caches=[cache],
            all_tokens=[tokens[:-1]],
            samplers=[request.sampler],
            logits_processors=[request.processors],
        )
        self.requests[uid] = request
        self.uids[rid] = uid

    def step(self):
        import mlx.core as mx

        try:
            _, responses = self.batch.next()
        except Exception as error:
            # One request's processor failing aborts the step for the batch:
            # end every request of the step rather than the worker.
            for uid, request in list(self.requests.items()):
                self.send({"id": request.id, "event": "error", "message": f"{type(error).__name__}: {error}"})
                self.batch.remove([uid])
            self.requests.clear()
            self.uids.clear()
            return
        for response in responses:
            request = self.requests.get(response.uid)
            if request is None:
                continue
            if request.first_token is None:
                request.first_token = time.perf_counter()
            finish = response.finish_reason
            if finish != "stop":
                request.generated += 1
                request.detokenizer.add_token(response.token)
            if finish is not None:
                request.detokenizer.finalize()
            request.text += request.detokenizer.last_segment
            stop_at = min((at for at in (request.text.find(s) for s in request.stop) if at >= 0), default=-1)
            if stop_at >= 0:
                request.text = request.text[:stop_at]
                finish = "stop"
            sendable = len(request.text) if finish is not None else held_back(request.text, request.stop)
            if sendable > request.sent:
                self.send({"id": request.id, "event": "text", "text": request.text[request.sent:sendable]})
                request.sent = sendable
            if finish is not None:
                if response.finish_reason is None:
                    self.batch.remove([response.uid])
                elif response.prompt_cache is not None:
                    self.prompt_cache.insert_cache(MODEL_KEY, list(response.all_tokens), response.prompt_cache)
                self.finish(response.uid, request, finish)

    def finish(self, uid, request, finish):
        import mlx.core as mx

        now = time.perf_counter()
        first = request.first_token or now
        prompt_tokens = len(request.prompt)
        self.send({
            "id": request.id,
            "event": "done",
            "finish_reason": "length" if finish == "length" else "stop",
            "prompt_tokens": prompt_tokens,
            "cached_tokens": request.cached,
            "generation_tokens": request.generated,
            "prompt_tps": (prompt_tokens - request.cached) / max(first - request.started, 1e-9),
            "generation_tps": request.generated / max(now - first, 1e-9),
            "prompt_seconds": first - request.started,
            "generation_seconds": now - first,
            "peak_memory": mx.get_peak_memory(),
            "active_memory": mx.get_active_memory(),
        })
        self.requests.pop(uid, None)
        self.uids.pop(request.id, None)

    def busy(self):
        return bool(self.requests)


def compute_device():
    """The device MLX computes on, for GetStatus: its kind, its name and its
    memory (0 where MLX does not tell, as on the CPU)."""
    import mlx.core as mx

    device = mx.default_device()
    if device.type == mx.cpu:
        kind = "cpu"
    elif mx.metal.is_available():
        kind = "metal"
    elif mx.cuda.is_available():
        kind = "cuda"
    else:
        kind = "gpu"
    info = mx.device_info(device)
    memory = info.get("total_memory", info.get("memory_size", 0))
    return {"kind": kind, "name": str(info.get("device_name", "")), "memory_total": int(memory)}


def held_back(text, stops):
    """How much of `text` can be sent: all but a tail that may begin a stop
    sequence, so a stop sequence never reaches the client in part."""
    keep = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                keep = max(keep, length)
                break
    return len(text) - keep


def read_requests(inbox):
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as error:
            emit({"event": "protocol_error", "message": f"malformed request line: {error}"})
            continue
        inbox.put(message)
    inbox.put(None)


def keep_compiled_kernels(cache_dir):
    """Points MLX's cache of compiled CUDA kernels under --cache-dir, one
    folder per MLX version as MLX's own default (/tmp/mlx/VERSION/ptx) has,
    so the warm-up's compilations outlive a cleaned /tmp or a reboot."""
    try:
        version = importlib.metadata.version("mlx")
    except importlib.metadata.PackageNotFoundError:
        return  # the worker's import of MLX reports it
    os.environ.setdefault("MLX_PTX_CACHE_DIR", str(Path(cache_dir) / "ptx" / version))


def main():
    global PROTOCOL
    parser = argparse.ArgumentParser(description="rigger-inference MLX worker")
    parser.add_argument("--model", required=True, help="mlx-lm model directory or GGUF file")
    parser.add_argument("--name", help="model name to report")
    parser.add_argument("--cache-dir", required=True, help="where converted GGUF models are kept")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--prefill-step", type=int, default=256)
    parser.add_argument("--prompt-cache", type=int, default=8, help="prompt KV caches kept for reuse")
    parser.add_argument("--dequantize", action="store_true", help="run in float32 (fast with a BLAS)")
    parser.add_argument("--warm-up", choices=("auto", "on", "off"), default="auto",
                        help="compile kernels before ready (auto: on a GPU)")
    args = parser.parse_args()
    keep_compiled_kernels(args.cache_dir)

    # Only protocol messages may reach stdout; libraries printing there
    # would corrupt the stream.
    PROTOCOL = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = Worker(args)
    except Exception as error:
        emit({"event": "fatal", "message": f"{type(error).__name__}: {error}"})
        sys.exit(1)

    inbox = queue.Queue()
    threading.Thread(target=read_requests, args=(inbox,), daemon=True).start()
    while True:
        try:
            message = inbox.get(block=not worker.busy())
        except queue.Empty:
            message = False
        if message is None:
            return
        if message:
            worker.handle(message)
            continue
        worker.step()


if __name__ == "__main__":
    main()
