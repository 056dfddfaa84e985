"""Writes tests/fixtures/meaning_golden.json: what WordLlama itself (the
PyPI package the on-topic rule's model comes from) makes of a few texts,
so that tests/meaning.rs can check the service's reading of the same model
(src/meaning/) against the reference, token for token.

Run with the venv `make eval` sets up (it installs wordllama):
    ~/.cache/rigger-inference/venv/bin/python scripts/meaning_golden.py
"""

import json
import logging
from pathlib import Path

logging.disable(logging.INFO)

import numpy as np  # noqa: E402
import wordllama  # noqa: E402
from wordllama import WordLlama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

TEXTS = [
    "Add password reset",
    "Let users reset a forgotten password by e-mail",
    "Compress log files older than a month into the archive directory",
    "sql: add support for LIMIT/OFFSET",
    "  two  spaces,\ttabs\nand a line break ",
    "Naïve café résumé — “quotes” 🚀 and 中文",
    "",
]

PAIRS = [(0, 1), (0, 2), (1, 2), (2, 3), (3, 5)]


def main() -> None:
    package = Path(wordllama.__file__).parent
    model = WordLlama.load("l2_supercat", dim=256, cache_dir=package, disable_download=True)
    texts = [text for text in TEXTS if text]
    vectors = np.asarray(model.embed(texts, norm=True), dtype=np.float64)
    by_text = dict(zip(texts, vectors))
    golden = {
        "tokens": [
            {"text": text, "ids": model.tokenize(text)[0].ids} for text in TEXTS
        ],
        "similarities": [
            {
                "a": TEXTS[a],
                "b": TEXTS[b],
                "cosine": round(float(by_text[TEXTS[a]] @ by_text[TEXTS[b]]), 5),
            }
            for a, b in PAIRS
        ],
    }
    out = ROOT / "tests/fixtures/meaning_golden.json"
    out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(out)


if __name__ == "__main__":
    main()
