"""A randomly initialised llama checkpoint with SmolLM2's tokenizer, for the
GPU bench (scripts/device-gpu.sh `models`): a Hugging Face directory
(config.json, one model.safetensors in bf16, the tokenizer files) that
mlx-lm loads as it is and llama.cpp's converter turns into a GGUF.

  random_llama.py OUT --tokenizer DIR --shape {1b,8b,smol}

Numpy only, so it runs on the device before MLX's wheels have arrived, and
writes one tensor at a time (an 8 B model never sits in memory whole). The
weights are noise: they measure serving speed, not answers.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

SHAPES = {
    # The 1.17 B shape.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=32, num_key_value_heads=8),
    # Llama 3 8B's shape (7 B with this vocabulary).
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8),
    # SmolLM2-135M's shape.
    "smol": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                 num_attention_heads=9, num_key_value_heads=3),
}

# bf16 bit patterns: a random sign and 7-bit mantissa under a fixed exponent
# of 2^-7, so every weight lies in ±[0.0078, 0.0156) (about the spread of
# a usual initialisation) and none is NaN or infinite; norms are exactly 1.
BF16_SIGN_AND_MANTISSA = 0x807F
BF16_EXPONENT_2_POW_MINUS_7 = 0x3C00
BF16_ONE = 0x3F80


def config_for(shape, vocab):
    return {
        "model_type": "llama",
        # llama.cpp's converter picks its model class by this name.
        "architectures": ["LlamaForCausalLM"],
        "torch_dtype": "bfloat16",
        **SHAPES[shape],
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }


def tensor_shapes(config):
    hidden = config["hidden_size"]
    head = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    inner = config["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes.update({
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (hidden, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, hidden),
            f"{prefix}.mlp.gate_proj.weight": (inner, hidden),
            f"{prefix}.mlp.up_proj.weight": (inner, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, inner),
        })
    return shapes


def random_bf16(rng, shape, name):
    if name.endswith("norm.weight"):
        return np.full(shape, BF16_ONE, dtype=np.uint16)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= BF16_SIGN_AND_MANTISSA
    bits |= BF16_EXPONENT_2_POW_MINUS_7
    return bits


def write_safetensors(path, shapes, rng):
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The format pads the header with spaces to a multiple of 8 bytes.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name, shape in shapes.items():
            out.write(random_bf16(rng, shape, name).tobytes())
    return offset // 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json and tokenizer_config.json")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    args = parser.parse_args()
    out, tokenizer = Path(args.out), Path(args.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    config = config_for(args.shape, vocab)
    parameters = write_safetensors(out / "model.safetensors", tensor_shapes(config), np.random.default_rng(0))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    print(f"built {out}: {args.shape}, {parameters / 1e9:.2f} B parameters, bf16")


if __name__ == "__main__":
    main()
