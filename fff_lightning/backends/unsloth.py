"""The ``unsloth`` backend: Unsloth's ``FastLanguageModel`` 4-bit load, its ``get_peft_model`` LoRA (fused kernels,
its own checkpointing), packed batches' sample lengths (one attention call per packed row:
:mod:`.packed_attention`), and optionally its fused LoRA matmuls for the MLPs that carry FFF (:mod:`.unsloth_mlp`).
GPU only; the one module that imports Unsloth besides :func:`preimport_unsloth`."""

from __future__ import annotations

import importlib.util
import logging

import torch

from fff_lightning.backends import Backend
from fff_lightning.errors import ConfigError
from fff_lightning.kinds.lora import peft_kwargs
from fff_lightning.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def device_map() -> dict:
    """One process: Unsloth's own placement (what docs/benchmarks.md measured). Several: this process's device,
    named as Unsloth names it, so every process loads its own copy onto its own GPU whatever the launcher."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return {"device_map": {"": f"cuda:{torch.cuda.current_device()}"}}
    return {}


class Unsloth(Backend):
    name = "unsloth"

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("model.base.backend", "unsloth needs a CUDA GPU; use hf or tiny on this machine")
        if importlib.util.find_spec("unsloth") is None:
            raise ConfigError("model.base.backend", "unsloth is not installed: pip install 'fff_lightning[gpu]'")

    def load(self, base, dtype):
        from fff_lightning.backends import unsloth_environment

        unsloth_environment()
        import unsloth  # noqa: F401  (first, so it can patch transformers/peft)
        from unsloth import FastLanguageModel
        from unsloth.utils import attention_dispatch

        from fff_lightning.backends import packed_attention

        log.info("packed rows attend with %s", packed_attention.configure(base.packed_attention, attention_dispatch))

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=self.model_path(base),
            max_seq_length=base.max_seq_length,
            dtype=dtype,
            load_in_4bit=base.load_in_4bit,
            # the repository named, as `hf` loads it and `download` fetches it (Unsloth would otherwise swap a
            # known id for its own pre-quantized copy, e.g. unsloth/mistral-7b-bnb-4bit, absent from an offline cache)
            use_exact_model_name=True,
            **device_map(),
        )
        if base.tokenizer:
            tokenizer = load_tokenizer(base.tokenizer)
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        return model, tokenizer

    def check_adapters(self, adapters) -> None:
        """Unsloth's fast generation calls an MLP's projections itself, not the MLP module, so a kind that hooks
        the MLP (the parallel bottleneck adapter) would train but be left out of ``predict``: refused."""
        hooked = [k.name for k in adapters.kinds() if k.hooks_mlp]
        if hooked:
            raise ConfigError(f"model.{hooked[0]}", "hooks the MLP module, which Unsloth's fast generation bypasses: "
                              "use model.base.backend hf for it")  # fmt: skip

    def lora_adder(self, base, shape, seed):
        """LoRA through Unsloth's ``get_peft_model`` (its fused kernels and checkpointing), in the spec's order."""

        def add(model, lora, wrapped: list[str]):
            from unsloth import FastLanguageModel

            return FastLanguageModel.get_peft_model(
                model,
                **peft_kwargs(lora, shape.num_hidden_layers, wrapped),
                use_gradient_checkpointing="unsloth" if base.gradient_checkpointing else False,
                random_state=seed if seed is not None else 3407,
            )

        return add

    def after_adapters(self, model, base, adapters, wrapped: list[str]) -> None:
        if wrapped and adapters.lora is not None and base.fuse_fff_mlp:
            from fff_lightning.backends.unsloth_mlp import fuse_fff_mlps

            log.info("FFF layers %s run Unsloth's fused LoRA matmuls", fuse_fff_mlps(model))

    def arm_checkpointing(self, model, adapters) -> None:
        if adapters.lora is None:  # with LoRA, get_peft_model armed Unsloth's own
            super().arm_checkpointing(model, adapters)

    def forward_kwargs(self, batch: dict) -> dict:
        kwargs = super().forward_kwargs(batch)
        if "packed_seq_lengths" in batch:  # Unsloth's attention reads the packed samples' lengths
            kwargs["packed_seq_lengths"] = batch["packed_seq_lengths"]
        return kwargs


BACKEND = Unsloth()
