"""The ``tiny`` backend: a random-weight Mistral of :class:`~fff_lightning.spec.TinyConfig`'s sizes (the real
architecture) with the real Mistral tokenizer from ``mistral-common``, for CPUs (tests, configs/tiny.yaml). Written
once per size and seed to the cache folder, then loaded like any local model through :mod:`.hf`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from fff_lightning.backends.hf import HF
from fff_lightning.files import cache_dir, write_atomically
from fff_lightning.tokenizer import load_tokenizer, save_tokenizer

VOCAB_SIZE = 32000  # Mistral's
POSITIONS = 32768


def tiny_shape(tiny):
    """The ``MistralConfig`` of a :class:`~fff_lightning.spec.TinyConfig`."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        initializer_range=tiny.initializer_range,
        max_position_embeddings=POSITIONS,
        tie_word_embeddings=False,
    )


def tiny_model_dir(base) -> Path:
    """Folder of the random-weight tiny model of a :class:`~fff_lightning.spec.BaseModelConfig`'s ``tiny`` sizes
    (weights + tokenizer), built once per size and seed."""
    tiny = base.tiny
    key = hashlib.sha256(json.dumps(asdict(tiny), sort_keys=True).encode()).hexdigest()[:12]

    def build(folder: Path) -> None:
        from transformers import MistralForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tiny.seed)
            model = MistralForCausalLM(tiny_shape(tiny))
        model.save_pretrained(folder)
        if not (folder / "config.json").is_file():  # transformers writes on torch.distributed's rank 0 only
            from safetensors.torch import save_model

            model.config.save_pretrained(folder)
            save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        save_tokenizer(load_tokenizer(None), folder)

    return write_atomically(cache_dir() / f"tiny-mistral-{key}", build)


class Tiny(HF):
    name = "tiny"

    def shape(self, base):
        return tiny_shape(base.tiny)

    def tokenizer_source(self, name_or_path: str) -> str | None:
        return None

    def model_name(self, base) -> str:
        return "tiny"

    def identity(self, base) -> str:
        return "tiny"  # not a path, whatever folder of that name the working directory holds

    def hub_model(self, base) -> str | None:
        return None  # built on this machine

    def model_path(self, base) -> str:
        return str(tiny_model_dir(base))


BACKEND = Tiny()
