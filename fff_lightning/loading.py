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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fff_lightning.adapters import load_adapters, mark_only_adapters_trainable, read_adapter_config
from fff_lightning.errors import ConfigError
from fff_lightning.fff import FFFConfig, FFFLinear, decoder_layers, inject_fff, parse_layers
from fff_lightning.lora import LoRAConfig, apply_lora
from fff_lightning.tokenizer import cache_dir, load_tokenizer, write_atomically

log = logging.getLogger(__name__)

MISTRAL_7B = "mistralai/Mistral-7B-v0.1"
#: Hub ids whose shape is Mistral-7B-v0.1's (``MistralConfig()`` defaults), known offline for budgets.
KNOWN_7B = {
    "mistralai/mistral-7b-v0.1",
    "mistralai/mistral-7b-instruct-v0.1",
    "mistralai/mistral-7b-instruct-v0.2",
    "unsloth/mistral-7b",
    "unsloth/mistral-7b-bnb-4bit",
    "unsloth/mistral-7b-v0.1-bnb-4bit",
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit",
}


@dataclass
class TinyConfig:
    """Sizes of the random-weight Mistral used on CPUs (tests, quickstart). Vocabulary: Mistral's 32,000."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    #: Larger than Mistral's 0.02 so the random output layer can express a next-token distribution that adapters
    #: (which cannot rescale logits after the final norm) visibly learn on a CPU quickstart.
    initializer_range: float = 0.2
    seed: int = 0


@dataclass
class BaseModelConfig:
    """Which base model to load and how.

    Attributes:
        backend: ``auto``, ``tiny``, ``hf`` or ``unsloth`` (see the module docstring).
        name_or_path: hub id or local folder (``hf``/``unsloth``); ignored by ``tiny``.
        load_in_4bit: bitsandbytes nf4 with double quantisation (``hf``) or Unsloth's 4-bit load.
        dtype: compute dtype: ``auto`` is bf16 on GPUs that support it, else float32.
        max_seq_length: longest sequence the run will use (Unsloth sizes its RoPE cache from it).
        gradient_checkpointing: recompute activations in backward to save memory (on Mistral-7B at 3 x 2048:
            about 5.8 instead of 26 GiB, at 0.7x the speed; see docs/benchmarks.md).
        checkpoint_layers: with gradient checkpointing, how many decoder layers (the first ones) recompute; the
            others keep their activations, trading memory for speed (about 0.65 GiB per layer at 3 x 2048 with
            LoRA, 0.8 with step 2's adapters). ``None``: all layers.
        compile_fff: run each FFF stack through ``torch.compile`` (fewer, fused kernels; compiles once, in
            seconds, on the first step); ``None``: on CUDA GPUs only.
        fuse_fff_mlp: on the unsloth backend with LoRA, run the MLPs that carry FFF with Unsloth's fused LoRA
            matmuls (:mod:`fff_lightning.unsloth_mlp`) instead of PEFT's modules: measured the same speed and
            0.2 GiB less memory on step 2; off until its gradients are checked against PEFT's on a GPU.
        tokenizer: tokenizer hub id or folder; default: the model's own (``tiny``: Mistral-7B's).
        tiny: sizes of the ``tiny`` model.
    """

    backend: Literal["auto", "tiny", "hf", "unsloth"] = "auto"
    name_or_path: str = MISTRAL_7B
    load_in_4bit: bool = True
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_seq_length: int = 2048
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None
    compile_fff: bool | None = None
    fuse_fff_mlp: bool = False
    tokenizer: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "tiny", "hf", "unsloth"):
            raise ConfigError("base.backend", f"unknown backend {self.backend!r}; allowed: auto, tiny, hf, unsloth")
        if self.max_seq_length <= 0:
            raise ConfigError("base.max_seq_length", f"must be positive; got {self.max_seq_length}")
        k = self.checkpoint_layers
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError("base.checkpoint_layers", f"must be an int >= 0 or null (all layers); got {k!r}")
        t = self.tiny
        for k, v in asdict(t).items():
            if k == "initializer_range":
                if not v > 0:
                    raise ConfigError("base.tiny.initializer_range", f"must be > 0; got {v!r}")
            elif k != "seed" and (not isinstance(v, int) or v <= 0):
                raise ConfigError(f"base.tiny.{k}", f"must be a positive int; got {v!r}")
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ConfigError(
                "base.tiny", "hidden_size must divide by num_attention_heads, and that by num_key_value_heads"
            )


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


def model_shape(cfg: BaseModelConfig):
    """The base model's ``transformers`` config, without loading or downloading any weight."""
    from transformers import AutoConfig, MistralConfig

    if cfg.backend == "tiny":
        t = cfg.tiny
        return MistralConfig(
            vocab_size=32000,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            initializer_range=t.initializer_range,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    if Path(cfg.name_or_path).is_dir():
        return AutoConfig.from_pretrained(cfg.name_or_path)
    if cfg.name_or_path.lower() in KNOWN_7B:
        return MistralConfig()  # its defaults are Mistral-7B-v0.1's shape
    try:
        return AutoConfig.from_pretrained(cfg.name_or_path)
    except Exception as e:  # no network, unknown id, gated repo...
        raise ConfigError(
            "base.name_or_path",
            f"cannot read the config of {cfg.name_or_path!r} ({type(e).__name__}); give a local folder or a known id "
            f"such as {MISTRAL_7B}",
        ) from e


def check_adapters(shape, fff: FFFConfig | None, lora: LoRAConfig | None) -> None:
    """Config checks that need the model's shape but no weights: run before loading anything heavy."""
    if fff is None and lora is None:
        raise ConfigError("model", "no adapter configured: give an fff section, a lora section, or both")
    n = shape.num_hidden_layers
    if fff is not None:
        parse_layers(fff.layers, n, "fff.layers")
    if lora is not None:
        parse_layers(lora.layers, n, "lora.layers")


def tiny_model_dir(cfg: BaseModelConfig) -> Path:
    """Folder of the random-weight tiny model (weights + tokenizer), built once per size and seed."""
    key = hashlib.sha256(json.dumps(asdict(cfg.tiny), sort_keys=True).encode()).hexdigest()[:12]

    def build(folder: Path) -> None:
        from transformers import MistralForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.seed)
            model = MistralForCausalLM(model_shape(cfg))
        model.save_pretrained(folder)
        load_tokenizer(None).save_pretrained(folder)

    return write_atomically(cache_dir() / f"tiny-mistral-{key}", build)


def _device_map():
    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))}
    return {"": "cpu"}


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
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
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
        model_name=path, max_seq_length=cfg.max_seq_length, dtype=dtype, load_in_4bit=cfg.load_in_4bit
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
    """Load the base model, inject FFF, add LoRA, freeze everything else, optionally load saved adapters.

    Args:
        base: which base model and backend.
        fff: FFF adapter, or ``None``.
        lora: LoRA adapter, or ``None``.
        adapter_path: a folder written by :func:`fff_lightning.adapters.save_adapters` to load into the adapters.
        seed: seeds the adapters' initialisation (the global RNG is left as it was).

    Returns:
        ``(model, tokenizer, shape)``: the adapted model (a ``PeftModel`` when LoRA is on), its tokenizer and the
        base model's ``transformers`` config.
    """
    shape = model_shape(base)
    check_adapters(shape, fff, lora)  # before anything heavy is loaded
    backend = resolve_backend(base.backend)
    dtype = compute_dtype(base)
    if backend == "unsloth":
        if not torch.cuda.is_available():
            raise ConfigError("base.backend", "unsloth needs a CUDA GPU; use hf or tiny on this machine")
        if importlib.util.find_spec("unsloth") is None:
            raise ConfigError("base.backend", "unsloth is not installed: pip install 'fff_lightning[gpu]'")
        model, tokenizer = _load_unsloth(base.name_or_path, base, dtype)
        if base.tokenizer:
            tokenizer = load_tokenizer(base.tokenizer)
        elif tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    else:
        path = str(tiny_model_dir(base)) if backend == "tiny" else base.name_or_path
        model = _load_hf(path, base, dtype)
        tokenizer = load_tokenizer(base.tokenizer or path)
    log.info("loaded %s through the %s backend (%s, 4-bit: %s)", base.name_or_path, backend, dtype, base.load_in_4bit)

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        wrapped = inject_fff(model, fff, shape.hidden_size, shape.rms_norm_eps) if fff is not None else []
        compiled = torch.cuda.is_available() if base.compile_fff is None else base.compile_fff
        for m in model.modules():
            if isinstance(m, FFFLinear):
                m.compiled = compiled
        if lora is not None:
            if backend == "unsloth":
                from unsloth import FastLanguageModel

                gc = "unsloth" if base.gradient_checkpointing else False
                model = FastLanguageModel.get_peft_model(
                    model,
                    **lora.peft_kwargs(shape.num_hidden_layers, wrapped),
                    use_gradient_checkpointing=gc,
                    random_state=seed if seed is not None else 3407,
                )
                if wrapped and base.fuse_fff_mlp:
                    from fff_lightning.unsloth_mlp import fuse_fff_mlps

                    fused = fuse_fff_mlps(model)
                    log.info("FFF layers %s run Unsloth's fused LoRA matmuls", fused)
            else:
                model = apply_lora(model, lora, shape.num_hidden_layers, wrapped)
    if base.gradient_checkpointing and not (backend == "unsloth" and lora is not None):
        _enable_checkpointing(model)
    if base.gradient_checkpointing and base.checkpoint_layers is not None:
        n = checkpoint_first_layers(model, base.checkpoint_layers)
        log.info("gradient checkpointing on the first %d of %d decoder layers", n, shape.num_hidden_layers)
    mark_only_adapters_trainable(model)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    return model, tokenizer, shape


def build_from_adapter(base: BaseModelConfig, adapter_path: str | Path, **kwargs):
    """Rebuild a model from a saved adapter folder: its JSON says which FFF/LoRA to create, then weights load."""
    saved = read_adapter_config(adapter_path)
    fff = FFFConfig(**saved["fff"]) if saved.get("fff") else None
    lora = LoRAConfig(**saved["lora"]) if saved.get("lora") else None
    return build_model(base, fff, lora, adapter_path=adapter_path, **kwargs)
