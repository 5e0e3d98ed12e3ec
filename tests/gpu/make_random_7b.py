"""Write a random-weight Mistral-7B (the real shape, bf16) and the Mistral tokenizer to a folder.

For GPU machines that reach no hub: speed and memory do not depend on the weights' values; losses do, so no loss
from such a model means anything. Usage: ``python tests/gpu/make_random_7b.py /tmp/mistral7b``.
"""

import sys
from pathlib import Path

import torch


def make(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, MistralConfig

    from fff_lightning.tokenizer import load_tokenizer, save_tokenizer

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(MistralConfig(), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    save_tokenizer(load_tokenizer(None), folder)
    return folder


def long_rows(path: Path, n: int = 120, words: int = 1800) -> Path:
    """A prompt/response jsonl whose rows fill a 2048-token window (seeded random words)."""
    import json
    import random

    rng = random.Random(0)
    vocab = "the model adapter layer token train loss value data batch memory speed gated norm width rank".split()
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            fh.write(
                json.dumps(
                    {"prompt": f"Summarise note {i}: {text[: len(text) // 2]}", "response": text[len(text) // 2 :]}
                )
                + "\n"
            )
    return path


if __name__ == "__main__":
    out = make(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        long_rows(Path(sys.argv[2]))
    print(f"wrote {out}")
