"""The FFF adapter: a stack of gated MLP sub-layers applied to the input of an MLP projection.

For a wrapped projection ``P`` (``up_proj`` or ``gate_proj`` of a decoder layer) and ``N`` sub-layers::

    x_0 = x
    x_{k+1} = x_k + FFN_k(RMSNorm_k(x_k))        # FFN_k(h) = d_proj(act_k(g_proj(h)) * u_proj(h))
    out = P(x_N)

Only ``P`` sees the transformed input; the other MLP projections still see ``x``. This is how the FFF study
(ostix360/ai-research, ``train_mistral/``) wired it. One sub-layer of width ``w`` on hidden size ``d`` has
``3*d*w + d`` parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fff_lightning.errors import ConfigError

#: Projections of a Mistral/Llama MLP whose input FFF may transform.
FFF_TARGETS = ("up_proj", "gate_proj")
#: Every FFF parameter name contains this; :mod:`fff_lightning.adapters` relies on it.
FFF_PREFIX = "fff_blocks"
#: Name of the wrapped projection inside :class:`FFFLinear` (not ``base_layer``: PEFT would take the wrapper
#: for one of its own layers).
INNER = "base_proj"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def activation_names() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(ACT2FN.keys())


def parse_layers(
    spec: str | int | list[int] | None, n_layers: int | None = None, field_name: str = "layers"
) -> list[int]:
    """Turn ``"all"``, ``"13-19"``, ``"0,2,5-7"``, ``7`` or ``[13, 14]`` into a sorted list of layer indices.

    Ranges are inclusive, as people say them ("layers 13-19" is seven layers). With ``n_layers`` the indices
    are checked against the model and ``"all"`` is expanded.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        if n_layers is None:
            raise ConfigError(field_name, '"all" needs the model\'s number of layers')
        return list(range(n_layers))
    if isinstance(spec, bool):
        raise ConfigError(field_name, f"expected 'all', a range like '13-19', or a list of ints; got {spec!r}")
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ConfigError(field_name, f"range {part!r} runs backwards")
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d+", part):
                items.append(int(part))
            else:
                raise ConfigError(field_name, f"cannot read {part!r}: use 'all', '13-19', '0,2,5-7' or a list of ints")
    else:
        items = [int(i) for i in spec]
    if not items:
        raise ConfigError(field_name, "selects no layer")
    if any(i < 0 for i in items):
        raise ConfigError(field_name, f"layer indices must be >= 0; got {sorted(items)}")
    if n_layers is not None and max(items) >= n_layers:
        bad = sorted(i for i in set(items) if i >= n_layers)
        raise ConfigError(
            field_name, f"layer(s) {bad} do not exist: the model has {n_layers} layers (0-{n_layers - 1})"
        )
    return sorted(set(items))


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
        dtype: dtype of the adapter's weights (``float32`` or ``bfloat16``); the output keeps the input's dtype.
        eps: epsilon of the sub-layers' RMSNorm; ``None`` takes the base model's ``rms_norm_eps``.
    """

    n_sublayers: int = 6
    width: int | list[int] = 128
    activation: str | list[str] = "gelu_new"
    targets: list[str] = field(default_factory=lambda: ["up_proj"])
    layers: str | int | list[int] = "all"
    init: Literal["normal", "identity"] = "identity"
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"
    eps: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def widths(self) -> list[int]:
        return list(self.width) if isinstance(self.width, (list, tuple)) else [self.width] * self.n_sublayers

    def activations(self) -> list[str]:
        a = self.activation
        return list(a) if isinstance(a, (list, tuple)) else [a] * self.n_sublayers

    def target_list(self) -> list[str]:
        return [self.targets] if isinstance(self.targets, str) else list(self.targets)

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        if not isinstance(self.n_sublayers, int) or isinstance(self.n_sublayers, bool) or self.n_sublayers <= 0:
            raise ConfigError("fff.n_sublayers", f"must be a positive int; got {self.n_sublayers!r}")
        widths = self.widths()
        if len(widths) != self.n_sublayers:
            raise ConfigError(
                "fff.width",
                f"gives {len(widths)} widths for {self.n_sublayers} sub-layers: give one int, or one per sub-layer",
            )
        if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ConfigError("fff.width", f"widths must be positive ints; got {self.width!r}")
        acts = self.activations()
        if len(acts) != self.n_sublayers:
            raise ConfigError(
                "fff.activation",
                f"gives {len(acts)} activations for {self.n_sublayers} sub-layers: give one name, or one per sub-layer",
            )
        known = activation_names()
        for a in acts:
            if a not in known:
                raise ConfigError("fff.activation", f"unknown activation {a!r}; allowed: {', '.join(known)}")
        targets = self.target_list()
        if not targets:
            raise ConfigError("fff.targets", f"name at least one of {', '.join(FFF_TARGETS)}")
        for t in targets:
            if t not in FFF_TARGETS:
                raise ConfigError("fff.targets", f"unknown projection {t!r}; allowed: {', '.join(FFF_TARGETS)}")
        if len(set(targets)) != len(targets):
            raise ConfigError("fff.targets", f"lists a projection twice: {targets}")
        if not (isinstance(self.layers, str) and self.layers.strip().lower() == "all"):
            parse_layers(self.layers, None, "fff.layers")  # syntax only; the model's depth is checked on injection
        if self.init not in ("normal", "identity"):
            raise ConfigError("fff.init", f"unknown init {self.init!r}; allowed: normal, identity")
        if self.dtype not in DTYPES:
            raise ConfigError("fff.dtype", f"unknown dtype {self.dtype!r}; allowed: float32, bfloat16")
        if not self.init_std > 0:
            raise ConfigError("fff.init_std", f"must be > 0; got {self.init_std!r}")

    def n_params(self, hidden_size: int, n_layers: int) -> int:
        """Closed-form parameter count: ``sum_k (3*d*w_k + d)`` per wrapped projection."""
        per_stack = sum(3 * hidden_size * w + hidden_size for w in self.widths())
        return per_stack * len(self.target_list()) * len(parse_layers(self.layers, n_layers, "fff.layers"))

    def legend(self) -> str:
        """The research's legend style for run names, e.g. ``[128]-6-[gelu_new]-[up_proj]``."""
        w = sorted(set(self.widths()))
        a = sorted(set(self.activations()))
        return f"[{','.join(map(str, w))}]-{self.n_sublayers}-[{','.join(a)}]-[{','.join(self.target_list())}]"


class RMSNorm(nn.Module):
    """Mistral's RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)``, one fused kernel where PyTorch has one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


_ACTIVATIONS: dict[str, nn.Module] = {}


def shared_activation(name: str) -> nn.Module:
    """One activation module per name, shared by every sub-layer: a compiled FFF stack then guards on the same
    object in every layer instead of recompiling once per sub-layer (``ACT2FN`` builds a new one per call)."""
    if name not in _ACTIVATIONS:
        from transformers.activations import ACT2FN

        _ACTIVATIONS[name] = ACT2FN[name]
    return _ACTIVATIONS[name]


def fff_stack(h: torch.Tensor, weights: list[tuple[torch.Tensor, ...]], acts: tuple, eps: float) -> torch.Tensor:
    """``x_{k+1} = x_k + d_k(act_k(g_k(n)) * u_k(n))`` with ``n = RMSNorm_k(x_k)``, for every sub-layer ``k``.

    ``weights[k]`` is ``(norm, g_proj, u_proj, d_proj)``. The gate and up halves run as one matmul (one read of
    ``n`` instead of two). A plain function of tensors, so ``torch.compile`` can fuse the norm, the casts, the
    activation and the residual into a few kernels, one graph for every layer of the same shape.
    """
    for w, act in zip(weights, acts, strict=True):
        h = h + sublayer_delta(h, *w, act, eps)
    return h


def sublayer_delta(h, norm_w, g_w, u_w, d_w, act, eps: float) -> torch.Tensor:
    """One sub-layer's output before the residual add."""
    n = F.rms_norm(h, (h.shape[-1],), norm_w, eps)  # (B, T, d)
    g, u = F.linear(n, torch.cat((g_w, u_w))).split(g_w.shape[0], dim=-1)  # (B, T, w) each
    return F.linear(act(g) * u, d_w)  # (B, T, d)


_COMPILED: dict = {}


def compiled_fff_stack():
    """``fff_stack`` under ``torch.compile`` (built once per process; shapes may vary, e.g. packed rows)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(fff_stack, dynamic=None)
    return _COMPILED["fn"]


class FFFSublayer(nn.Module):
    """One pre-norm gated MLP, ``h -> d_proj(act(g_proj(n)) * u_proj(n))`` with ``n = RMSNorm(h)``, bias-free."""

    def __init__(self, dim: int, width: int, activation: str, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.g_proj = nn.Linear(dim, width, bias=False)
        self.u_proj = nn.Linear(dim, width, bias=False)
        self.d_proj = nn.Linear(width, dim, bias=False)
        self.act = shared_activation(activation)

    def weights(self) -> tuple[torch.Tensor, ...]:
        return self.norm.weight, self.g_proj.weight, self.u_proj.weight, self.d_proj.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The sub-layer's delta (without the residual)."""
        return sublayer_delta(h, *self.weights(), self.act, self.norm.eps)

    def reset_parameters(self, init: str, std: float) -> None:
        nn.init.ones_(self.norm.weight)
        for lin in (self.g_proj, self.u_proj, self.d_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
        if init == "identity":
            nn.init.zeros_(self.d_proj.weight)


class FFFLinear(nn.Module):
    """Wraps a projection (``nn.Linear``, bitsandbytes ``Linear4bit`` or a PEFT LoRA layer) and transforms its input.

    Exposes no ``.weight`` on purpose: Unsloth's fused MLP kernels read ``up_proj.weight`` directly and would
    bypass the adapter; without it, Unsloth falls back to calling the module.

    ``compiled`` runs the stack through ``torch.compile`` (see :func:`compiled_fff_stack`); the result is the same
    function, computed with fewer kernels.
    """

    def __init__(self, base_proj: nn.Module, dim: int, cfg: FFFConfig, eps: float):
        super().__init__()
        self.base_proj = base_proj
        dtype = DTYPES[cfg.dtype]
        device = _device_of(base_proj)
        self.fff_blocks = nn.ModuleList(
            FFFSublayer(dim, w, a, eps) for w, a in zip(cfg.widths(), cfg.activations(), strict=True)
        )
        for block in self.fff_blocks:
            block.reset_parameters(cfg.init, cfg.init_std)
        self.fff_blocks.to(device=device, dtype=dtype)
        self.eps = eps
        self.compiled = False

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``x_N``: the input the wrapped projection sees, in ``x``'s dtype."""
        blocks = self.fff_blocks
        run = compiled_fff_stack() if self.compiled else fff_stack
        h = run(
            x.to(blocks[0].norm.weight.dtype), [b.weights() for b in blocks], tuple(b.act for b in blocks), self.eps
        )
        return h.to(x.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_proj(self.transform(x), *args, **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly PEFT-wrapped) Mistral/Llama causal LM."""
    inner = model
    for attr in ("base_model", "model"):  # PeftModel -> LoraModel -> CausalLM -> MistralModel
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            nxt = getattr(inner, attr)
            if nxt is inner:
                break
            inner = nxt
    if not hasattr(inner, "layers"):
        raise TypeError(f"cannot find decoder layers in {type(model).__name__}")
    return inner.layers


def inject_fff(model: nn.Module, cfg: FFFConfig, hidden_size: int, eps: float = 1e-5) -> list[str]:
    """Wrap the targeted projections of the chosen decoder layers with :class:`FFFLinear`, in place.

    Returns the wrapped modules' names (``model.layers.13.mlp.up_proj``...). Raises :class:`ConfigError` when a
    layer or projection does not exist. Call it before LoRA (see :mod:`fff_lightning.lora`).
    """
    layers = decoder_layers(model)
    idx = parse_layers(cfg.layers, len(layers), "fff.layers")
    eps = cfg.eps if cfg.eps is not None else eps
    wrapped = []
    for i in idx:
        mlp = layers[i].mlp
        for t in cfg.target_list():
            proj = getattr(mlp, t, None)
            if proj is None:
                raise ConfigError("fff.targets", f"decoder layer {i} has no MLP projection {t!r}")
            if isinstance(proj, FFFLinear):
                raise ConfigError("fff.targets", f"layer {i} {t} already carries an FFF adapter")
            setattr(mlp, t, FFFLinear(proj, hidden_size, cfg, eps))
            wrapped.append(f"layers.{i}.mlp.{t}")
    return wrapped
