"""The FFF kind: a stack of gated MLP sub-layers on the input of an MLP projection (the study's adapter).

Its config (``model.fff``), how it is checked, put on a model (the layer itself, which needs torch, is
:mod:`fff_lightning.fff`), told apart, named, sized by ``budget --match fff`` (its width, the run's other adapters
as given) and planned in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fff_lightning.checks import choice, is_all, parse_layers, positive_int
from fff_lightning.errors import ConfigError
from fff_lightning.kinds import AdapterKind, Injection, register

#: Projections of a Mistral/Llama MLP whose input FFF may transform.
FFF_TARGETS = ("up_proj", "gate_proj")
#: Every FFF parameter name contains this (the wrapper's ``fff_blocks``, :class:`fff_lightning.fff.FFFLinear`).
FFF_PREFIX = "fff_blocks"
#: Name of the wrapped projection inside an FFF wrapper (not ``base_layer``: PEFT would take the wrapper for one
#: of its own layers); LoRA names it to adapt what FFF feeds.
INNER = "base_proj"
FFF_INITS = ("normal", "identity")
FFF_DTYPES = ("float32", "bfloat16", "float16")
MAX_SUBLAYERS = 64  # the research used at most 6
#: FFF stacks recomputed in backward run in this many token chunks, so backward holds one chunk's activations
#: (the layer and the memory plan both read it).
FFF_CHUNKS = 4


def activation_names() -> list[str]:
    from transformers.activations import ACT2FN  # the only heavy import a config check makes, and only for FFF

    return sorted(ACT2FN.keys())


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


@register
class FFFKind(AdapterKind):
    name = "fff"
    config = FFFConfig
    title = "FFF"
    order = 10  # first: LoRA then names the wrapped projections' inner layer
    match_field = "width"
    match_alone = False  # step 2: FFF's width is matched with the run's LoRA kept
    planned_in_memory = True

    def owns(self, param: str) -> bool:
        return f".{FFF_PREFIX}." in param or param.startswith(f"{FFF_PREFIX}.")

    def inject(self, model, cfg: FFFConfig, shape, ctx: Injection):
        from fff_lightning.fff import inject_fff

        ctx.wrapped += inject_fff(model, cfg, shape.hidden_size, shape.rms_norm_eps, chunks=FFF_CHUNKS)
        return model

    def legend(self, cfg: FFFConfig) -> str:
        widths = ",".join(map(str, sorted(set(cfg.widths()))))
        acts = ",".join(sorted(set(cfg.activations())))
        return f"fff-[{widths}]-{cfg.n_sublayers}-[{acts}]-[{','.join(cfg.targets)}]"

    def with_size(self, cfg: FFFConfig, value: int) -> FFFConfig:
        from dataclasses import replace

        return replace(cfg, width=value)
