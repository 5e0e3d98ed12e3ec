"""Loading the base model and putting the adapters on it: the one entry point, :func:`build_model`.

How a model is loaded, gets LoRA, checkpoints and is called is its backend's (:mod:`fff_lightning.backends`:
``tiny``, ``hf``, ``unsloth``, ``auto``); this module runs the steps in the one order that works on all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fff_lightning import backends
from fff_lightning.adapters import apply_adapters, load_adapters, resolve_adapters
from fff_lightning.fff import FFFLinear, decoder_layers
from fff_lightning.plan import plan_run
from fff_lightning.spec import AdapterSpec, BaseModelConfig, FFFConfig, LoRAConfig, TinyConfig

__all__ = ["BaseModelConfig", "TinyConfig", "build_from_adapter", "build_model", "load_model"]
log = logging.getLogger(__name__)


def compute_dtype(cfg: BaseModelConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def checkpoint_first_layers(model: nn.Module, k: int) -> int:
    """Keep gradient checkpointing on the first ``k`` decoder layers only (transformers and Unsloth read each
    layer's own flag); returns how many layers checkpoint."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if i >= k and hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
    return sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers)


def build_model(
    base: BaseModelConfig,
    fff: FFFConfig | None = None,
    lora: LoRAConfig | None = None,
    adapter_path: str | Path | None = None,
    seed: int | None = None,
    **others,
):
    """Load the base model with FFF and/or LoRA on it (the adapters of ``adapter_path`` when given).

    Args:
        base: which base model and backend.
        fff: FFF adapter, or ``None``.
        lora: LoRA adapter, or ``None``.
        adapter_path: a folder written by :func:`fff_lightning.adapters.save_adapters`; its own config decides the
            adapters (``fff``/``lora``, if given, must agree with it) and its weights are loaded into them.
        seed: seeds the adapters' initialisation (the global RNG is left as it was).
        others: other adapter kinds' configs by name (``dora=...``, ``par_bn=...``).

    Returns:
        ``(model, tokenizer, shape)``: the adapted model (a ``PeftModel`` when LoRA is on), its tokenizer and the
        base model's ``transformers`` config.
    """
    return load_model(base, resolve_adapters(fff, lora, adapter_path, **others), adapter_path=adapter_path, seed=seed)


def build_from_adapter(base: BaseModelConfig, adapter_path: str | Path, **kwargs):
    """Rebuild a model from a saved adapter folder: its JSON says which FFF/LoRA to create, then weights load."""
    return build_model(base, adapter_path=adapter_path, **kwargs)


def load_model(
    base: BaseModelConfig, adapters: AdapterSpec, adapter_path: str | Path | None = None, seed=None, plan=None
):
    """:func:`build_model` for an :class:`~fff_lightning.spec.AdapterSpec` already resolved; ``plan``: the run's
    :class:`~fff_lightning.plan.RunPlan` (its shape, its checks already made), else they are made here."""
    if plan is None:
        plan = plan_run(base, adapters, adapter_path)
    shape = plan.shape
    backend = backends.get(base.backend)
    backend.check_available()
    backend.check_adapters(adapters)
    dtype = compute_dtype(base)
    model, tokenizer = backend.load(base, dtype)
    log.info("loaded %s through the %s backend (%s, 4-bit: %s)", backend.model_name(base), backend.name, dtype,
             base.load_in_4bit)  # fmt: skip

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model, wrapped = apply_adapters(adapters, model, shape, add_lora=backend.lora_adder(base, shape, seed))
    compiled = torch.cuda.is_available() if base.compile_fff is None else base.compile_fff
    for m in model.modules():
        if isinstance(m, FFFLinear):
            m.compiled, m.recompute = compiled, base.recompute_fff
    backend.after_adapters(model, base, adapters, wrapped)
    if base.gradient_checkpointing:
        backend.arm_checkpointing(model, adapters)
    if base.gradient_checkpointing and base.checkpoint_layers is not None:
        n = checkpoint_first_layers(model, base.checkpoint_layers)
        log.info("gradient checkpointing on the first %d of %d decoder layers", n, shape.num_hidden_layers)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    return model, tokenizer, shape
