"""The real Mistral-7B tokenizer, offline, from the ``mistral-common`` package.

``mistral_common/data/tokenizer.model.v1`` is Mistral-7B-v0.1's SentencePiece model (32,000 tokens, bos 1,
eos 2). ``LlamaTokenizer(vocab_file=...)`` silently builds a 3-token vocabulary in transformers 5, so we write
a folder that ``AutoTokenizer.from_pretrained`` reads the normal way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fff_lightning.cache import cache_dir, write_atomically


def mistral_tokenizer_dir() -> Path:
    """A folder holding Mistral-7B-v0.1's tokenizer, built from ``mistral-common`` on first use."""

    def build(folder: Path) -> None:
        import mistral_common

        src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        shutil.copy(src, folder / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 32768,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    return write_atomically(cache_dir() / "mistral-7b-v0.1-tokenizer", build)


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """``AutoTokenizer`` for a hub id or folder; ``None`` gives the offline Mistral-7B tokenizer.

    Mistral has no pad token; we pad with ``<unk>`` (id 0) so padding is never mistaken for end of text.
    Padded positions are masked out of the loss anyway.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path or mistral_tokenizer_dir()))
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok
