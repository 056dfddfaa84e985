"""Writes tiny random-weight GGUF models of several llama.cpp architectures,
for tests that need many models of different families without a download.

Each model speaks SmolLM2's tokenizer (its `tokenizer.*` metadata, chat
template included, copied from the SmolLM2 GGUF), so prompts, stop tokens and
constrained decoding behave as with the real model; only the answers are noise.
Shapes are small (2 layers, hidden 64) but the vocabulary is the tokenizer's,
so the tied token embedding (F16) is most of each file (8 MB). Weights come
from a seeded generator: every run writes the same bytes, so a seeded request
gets the same answer after any setup.

Usage: python tiny_gguf.py --tokenizer-from SMOLLM2.gguf OUT_DIR
"""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

SEED = 14
LAYERS = 2
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 4 * HIDDEN
CONTEXT = 2048
ROPE_BASE = 10000.0
NORM_EPS = 1e-5
# Standard deviation of the random weights, as in the families' initialisers.
INIT_STD = 0.02
MODEL_NAME = "Tiny random model with the SmolLM2 tokenizer"


@dataclass(frozen=True)
class Family:
    """How one llama.cpp architecture lays out a transformer block."""

    arch: str
    # LayerNorm with biases (starcoder2) instead of RMSNorm.
    layer_norm: bool = False
    # One attn_qkv matrix (phi3) instead of attn_q, attn_k, attn_v.
    fused_qkv: bool = False
    # Biases on the q, k, v projections (qwen2, starcoder2).
    qkv_bias: bool = False
    # RMSNorm over each head of q and k (qwen3).
    qk_norm: bool = False
    # Gated FFN: ffn_gate beside ffn_up (llama, qwen, gemma); phi3 stacks
    # gate and up in one ffn_up twice as tall; starcoder2 has no gate.
    ffn: str = "gate"
    # Biases on the output and FFN projections (starcoder2).
    out_bias: bool = False


FAMILIES = [
    Family("llama"),
    Family("qwen2", qkv_bias=True),
    Family("qwen3", qk_norm=True),
    Family("phi3", fused_qkv=True, ffn="stacked"),
    Family("gemma"),
    Family("starcoder2", layer_norm=True, qkv_bias=True, ffn="plain", out_bias=True),
]


class MetadataReader(GGUFReader):
    """GGUFReader over a plain view of the file's mapping.

    The reader slices its np.memmap once per metadata item; a memmap slice
    costs about 10 µs more than an ndarray slice, 4 s for SmolLM2's 98 000
    tokens and merges, against about 1 s this way.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, mapping: np.memmap) -> None:
        self._plain = mapping.view(np.ndarray)


class SharedTokenizerWriter(GGUFWriter):
    """GGUFWriter that packs each metadata array once for all models.

    The models share SmolLM2's tokenizer; packing its 98 000 strings item by
    item takes about 0.25 s a model, a cost paid once this way.
    """

    _packed: dict[tuple[int, bool], tuple[object, bytes]] = {}

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype != GGUFValueType.ARRAY:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        key = (id(val), add_vtype)
        # The value is kept with its bytes so that its id is not reused.
        if key not in self._packed:
            self._packed[key] = (val, super()._pack_val(val, vtype, add_vtype, sub_type))
        return self._packed[key][1]


MetadataItem = tuple[str, object, GGUFValueType, GGUFValueType | None]


def tokenizer_metadata(path: Path) -> list[MetadataItem]:
    """The `tokenizer.*` items of a GGUF: key, value, type, array item type."""
    reader = MetadataReader(path)
    items = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        items.append((key, field.contents(), kind, sub))
    return items


def block_tensors(family: Family, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and numpy shapes (out, in) of one block's tensors."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = []

    def norm(name: str) -> None:
        tensors.append((f"{name}.weight", (HIDDEN,)))
        if family.layer_norm:
            tensors.append((f"{name}.bias", (HIDDEN,)))

    norm("attn_norm")
    if family.fused_qkv:
        tensors.append(("attn_qkv.weight", (q + 2 * kv, HIDDEN)))
    else:
        for name, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            tensors.append((f"{name}.weight", (rows, HIDDEN)))
            if family.qkv_bias:
                tensors.append((f"{name}.bias", (rows,)))
    if family.qk_norm:
        tensors += [("attn_q_norm.weight", (HEAD_DIM,)), ("attn_k_norm.weight", (HEAD_DIM,))]
    tensors.append(("attn_output.weight", (HIDDEN, q)))
    if family.out_bias:
        tensors.append(("attn_output.bias", (HIDDEN,)))
    norm("ffn_norm")
    if family.ffn == "gate":
        tensors.append(("ffn_gate.weight", (FFN, HIDDEN)))
    up_rows = 2 * FFN if family.ffn == "stacked" else FFN
    tensors.append(("ffn_up.weight", (up_rows, HIDDEN)))
    tensors.append(("ffn_down.weight", (HIDDEN, FFN)))
    if family.out_bias:
        tensors += [("ffn_up.bias", (up_rows,)), ("ffn_down.bias", (HIDDEN,))]
    return [(f"blk.{layer}.{name}", shape) for name, shape in tensors]


def model_tensors(family: Family, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model; the output projection is tied to token_embd."""
    tensors = [("token_embd.weight", (vocab, HIDDEN))]
    for layer in range(LAYERS):
        tensors += block_tensors(family, layer)
    tensors.append(("output_norm.weight", (HIDDEN,)))
    if family.layer_norm:
        tensors.append(("output_norm.bias", (HIDDEN,)))
    return tensors


def tensor_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm scales are one and biases zero, as at initialisation; matrices are
    random F16 (llama.cpp keeps 1-D tensors in F32)."""
    if len(shape) == 1:
        fill = 1.0 if "norm.weight" in name else 0.0
        return np.full(shape, fill, dtype=np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(np.float16)


def write_model(
    family: Family, tokenizer: list[MetadataItem], vocab: int, out: Path
) -> tuple[int, int]:
    """Writes one model (atomically) and returns (parameters, bytes)."""
    name = f"tiny-{family.arch}"
    path = out / f"{name}.gguf"
    part = out / f"{name}.gguf.part"
    writer = SharedTokenizerWriter(part, family.arch)
    writer.add_type("model")
    # Not the family: llama.cpp gives a vocabulary Phi-3's token quirks when
    # general.name says "phi3", and these models speak SmolLM2's.
    writer.add_name(MODEL_NAME)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_vocab_size(vocab)
    if family.layer_norm:
        writer.add_layer_norm_eps(NORM_EPS)
    else:
        writer.add_layer_norm_rms_eps(NORM_EPS)
    for key, value, kind, sub in tokenizer:
        writer.add_key_value(key, value, kind, sub_type=sub)

    # One generator per family: adding a family leaves the others' bytes alone.
    rng = np.random.default_rng([SEED, FAMILIES.index(family)])
    parameters = 0
    for tensor, shape in model_tensors(family, vocab):
        value = tensor_value(tensor, shape, rng)
        parameters += value.size
        dtype = GGMLQuantizationType.F16 if value.dtype == np.float16 else GGMLQuantizationType.F32
        writer.add_tensor(tensor, value, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(part, path)
    return parameters, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="directory the models are written to")
    parser.add_argument(
        "--tokenizer-from",
        type=Path,
        required=True,
        help="GGUF whose tokenizer the models share (SmolLM2's)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    tokenizer = tokenizer_metadata(args.tokenizer_from)
    vocab = next(len(value) for key, value, _, _ in tokenizer if key == "tokenizer.ggml.tokens")
    for family in FAMILIES:
        parameters, size = write_model(family, tokenizer, vocab, args.out)
        print(f"tiny-{family.arch}.gguf\t{family.arch}\t{parameters} parameters\t{size} bytes")


if __name__ == "__main__":
    main()
