"""Loading the base model and putting the adapters on it: the one entry point, :func:`build_model`.

Backends:

* ``tiny``: a random-weight Mistral of the given sizes (the real architecture) with the real Mistral
  tokenizer from ``mistral-common``; written once to a cache folder, then loaded like any local model.
* ``hf``: transformers, in bf16/fp32 or bitsandbytes nf4 4-bit with double quantisation.
* ``unsloth``: Unsloth's ``FastLanguageModel`` in 4-bit (GPU only; Unsloth is imported on this path alone).
* ``auto``: ``unsloth`` when CUDA and Unsloth are present, else ``hf``.

Nothing else in the project imports Unsloth or bitsandbytes, except :mod:`fff_lightning.unsloth_mlp`, which this
module calls on the unsloth backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from fff_lightning.adapters import (
    adapter_shapes,
    apply_adapters,
    check_adapter_folder,
    check_size,
    load_adapters,
    resolve_adapters,
)
from fff_lightning.errors import ConfigError
from fff_lightning.fff import FFFLinear, decoder_layers
from fff_lightning.files import cache_dir, write_atomically
from fff_lightning.lora import peft_kwargs
from fff_lightning.spec import AdapterSpec, BaseModelConfig, FFFConfig, LoRAConfig, TinyConfig
from fff_lightning.tokenizer import load_tokenizer, save_tokenizer

__all__ = ["BaseModelConfig", "TinyConfig", "build_from_adapter", "build_model", "load_model", "tiny_model_dir"]
log = logging.getLogger(__name__)


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "hf"


def preimport_unsloth() -> bool:
    """Import Unsloth now if this machine would use it (CUDA + Unsloth installed, ``FFF_NO_UNSLOTH`` unset).

    Unsloth patches transformers and PEFT when it is imported and must come before them; entry points call this
    before reading configs (config checks import ``transformers.activations``). Returns whether it imported.
    """
    if os.environ.get("FFF_NO_UNSLOTH") or "unsloth" in sys.modules:
        return "unsloth" in sys.modules
    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        return False
    import unsloth  # noqa: F401

    return True


def compute_dtype(cfg: BaseModelConfig) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def tiny_model_dir(cfg: BaseModelConfig) -> Path:
    """Folder of the random-weight tiny model (weights + tokenizer), built once per size and seed."""
    key = hashlib.sha256(json.dumps(asdict(cfg.tiny), sort_keys=True).encode()).hexdigest()[:12]

    def build(folder: Path) -> None:
        from transformers import MistralForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.seed)
            model = MistralForCausalLM(cfg.shape())
        model.save_pretrained(folder)
        save_tokenizer(load_tokenizer(None), folder)

    return write_atomically(cache_dir() / f"tiny-mistral-{key}", build)


def _device_map():
    """The whole model on this process's device: under Lightning (one device or DDP, whatever the launcher:
    its own, torchrun, SLURM) the strategy has made it the current CUDA device before the model is configured,
    so each process loads its own (4-bit) copy onto its own GPU."""
    if torch.cuda.is_available():
        return {"": torch.device("cuda", torch.cuda.current_device())}
    return {"": "cpu"}


def _unsloth_device_map() -> dict:
    """One process: Unsloth's own placement (what docs/benchmarks.md measured). Several: this process's device,
    named as Unsloth names it, so every process loads its own copy onto its own GPU whatever the launcher."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return {"device_map": {"": f"cuda:{torch.cuda.current_device()}"}}
    return {}


def _load_hf(path: str, cfg: BaseModelConfig, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(dtype=dtype, device_map=_device_map())
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:  # no network, an unknown id, a gated repository, a folder without weights
        raise ConfigError(
            "model.base.name_or_path",
            f"cannot load {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); check the id, the network "
            "(HF_HUB_OFFLINE) and access, or give a local folder",
        ) from None
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _disable_bnb_cpu_repack(model)
    return model


def _disable_bnb_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes 0.50.2 on AVX512-BF16 CPUs repacks every ``Linear4bit`` after one forward under
    ``torch.inference_mode()`` (what Lightning's validation uses), and gradients then stop flowing through it.
    Switching that path off on each module keeps training correct after validation."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _load_unsloth(path: str, cfg: BaseModelConfig, dtype: torch.dtype):
    import unsloth  # noqa: F401  (first, so it can patch transformers/peft)
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=cfg.max_seq_length,
        dtype=dtype,
        load_in_4bit=cfg.load_in_4bit,
        **_unsloth_device_map(),
    )
    return model, tokenizer


def _enable_checkpointing(model: nn.Module) -> None:
    # use_reentrant=False lets gradients reach adapters even though the frozen inputs do not require grad. So no
    # enable_input_require_grads(): it would make backward run down to the embeddings even when the first adapter
    # sits in layer 13 (FFF on layers 13-19 only needs layers 13-31's backward).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


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
):
    """Load the base model with FFF and/or LoRA on it (the adapters of ``adapter_path`` when given).

    Args:
        base: which base model and backend.
        fff: FFF adapter, or ``None``.
        lora: LoRA adapter, or ``None``.
        adapter_path: a folder written by :func:`fff_lightning.adapters.save_adapters`; its own config decides the
            adapters (``fff``/``lora``, if given, must agree with it) and its weights are loaded into them.
        seed: seeds the adapters' initialisation (the global RNG is left as it was).

    Returns:
        ``(model, tokenizer, shape)``: the adapted model (a ``PeftModel`` when LoRA is on), its tokenizer and the
        base model's ``transformers`` config.
    """
    return load_model(base, resolve_adapters(fff, lora, adapter_path), adapter_path=adapter_path, seed=seed)


def build_from_adapter(base: BaseModelConfig, adapter_path: str | Path, **kwargs):
    """Rebuild a model from a saved adapter folder: its JSON says which FFF/LoRA to create, then weights load."""
    return build_model(base, adapter_path=adapter_path, **kwargs)


def load_model(base: BaseModelConfig, adapters: AdapterSpec, adapter_path: str | Path | None = None, seed=None):
    """:func:`build_model` for an :class:`~fff_lightning.spec.AdapterSpec` already resolved."""
    shape = base.shape()
    check_before_loading(base, adapters, shape, adapter_path)
    backend = resolve_backend(base.backend)
    dtype = compute_dtype(base)
    if backend == "unsloth":
        if not torch.cuda.is_available():
            raise ConfigError("model.base.backend", "unsloth needs a CUDA GPU; use hf or tiny on this machine")
        if importlib.util.find_spec("unsloth") is None:
            raise ConfigError("model.base.backend", "unsloth is not installed: pip install 'fff_lightning[gpu]'")
        model, tokenizer = _load_unsloth(base.name_or_path, base, dtype)
        if base.tokenizer:
            tokenizer = load_tokenizer(base.tokenizer)
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    else:
        path = str(tiny_model_dir(base)) if backend == "tiny" else base.name_or_path
        model = _load_hf(path, base, dtype)
        tokenizer = load_tokenizer(base.tokenizer or path)
    name = "the tiny random Mistral" if backend == "tiny" else base.name_or_path
    log.info("loaded %s through the %s backend (%s, 4-bit: %s)", name, backend, dtype, base.load_in_4bit)

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        add_lora = _unsloth_lora(base, shape, seed) if backend == "unsloth" else None
        model, wrapped = apply_adapters(adapters, model, shape, add_lora=add_lora)
    compiled = torch.cuda.is_available() if base.compile_fff is None else base.compile_fff
    for m in model.modules():
        if isinstance(m, FFFLinear):
            m.compiled = compiled
    if backend == "unsloth" and wrapped and adapters.lora is not None and base.fuse_fff_mlp:
        from fff_lightning.unsloth_mlp import fuse_fff_mlps

        log.info("FFF layers %s run Unsloth's fused LoRA matmuls", fuse_fff_mlps(model))
    if base.gradient_checkpointing and not (backend == "unsloth" and adapters.lora is not None):
        _enable_checkpointing(model)  # Unsloth's get_peft_model armed its own
    if base.gradient_checkpointing and base.checkpoint_layers is not None:
        n = checkpoint_first_layers(model, base.checkpoint_layers)
        log.info("gradient checkpointing on the first %d of %d decoder layers", n, shape.num_hidden_layers)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    return model, tokenizer, shape


def check_before_loading(base: BaseModelConfig, adapters: AdapterSpec, shape, adapter_path=None) -> None:
    """Every check of a run's model that needs no weight: the base model's limits, the adapters' layers, ranks and
    size, and a saved adapter folder's header against the adapters it describes."""
    base.check(shape)
    adapters.check(shape)
    check_size(adapters, shape)
    if adapter_path is not None:
        check_adapter_folder(adapter_path, adapter_shapes(adapters, shape), shape)


def _unsloth_lora(base: BaseModelConfig, shape, seed: int | None):
    """LoRA through Unsloth's ``get_peft_model`` (its fused kernels and checkpointing), in the spec's order."""

    def add(model, lora: LoRAConfig, wrapped: list[str]):
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            **peft_kwargs(lora, shape.num_hidden_layers, wrapped),
            use_gradient_checkpointing="unsloth" if base.gradient_checkpointing else False,
            random_state=seed if seed is not None else 3407,
        )

    return add
