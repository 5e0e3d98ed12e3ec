"""The parallel bottleneck adapter on the MLP (He et al. 2022, "Towards a Unified View of Parameter-Efficient
Transfer Learning"; AdapterHub's ``par_bn``): beside each chosen decoder layer's MLP, a small bottleneck whose
output is added to the MLP's::

    mlp'(x) = mlp(x) + scaling * up(act(down(x)))        # down: d -> b, up: b -> d, both with a bias

``up`` starts at zero, so step 0 is the base model. One layer's adapter has ``2*d*b + b + d`` parameters. A peer
the FFF study compares against (FFF transforms a projection's input; this adds a parallel branch), as one module:
its config (``model.par_bn``), its layer, how it is put on a model, named and sized (``budget --match par_bn``:
its bottleneck width). It may share a model with FFF and LoRA (LoRA still adapts the MLP's own projections). The
memory plan is not calibrated for it, and the unsloth backend refuses it (Unsloth's fast generation calls the MLP's
projections directly, so the hook would not run in ``predict``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fff_lightning.checks import choice, is_all, parse_layers, positive_int
from fff_lightning.errors import ConfigError
from fff_lightning.kinds import AdapterKind, Injection, register

#: The attribute of an MLP that holds its adapter; every parameter of the kind has ``.par_bn.`` in its name.
ATTRIBUTE = "par_bn"
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ParallelBottleneckConfig:
    """What parallel bottleneck adapter to build.

    Attributes:
        bottleneck: the bottleneck width ``b`` (AdapterHub sets it as hidden size / reduction factor).
        scaling: the factor on the adapter's output (He et al.: 4).
        activation: ``relu`` (AdapterHub's default), ``gelu``, ``silu`` or ``tanh``.
        layers: decoder layers whose MLP gets one: ``"all"``, ``"13-19"``, ``"0,2,5-7"`` or a list of ints.
        dtype: the adapter's weights' dtype (``float32``, ``bfloat16`` or ``float16``); its output takes the MLP's.
    """

    bottleneck: int = 64
    scaling: float = 4.0
    activation: str = "relu"
    layers: str | int | list[int] = "all"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        positive_int("model.par_bn.bottleneck", self.bottleneck)
        if (
            isinstance(self.scaling, bool)
            or not isinstance(self.scaling, int | float)
            or not math.isfinite(self.scaling)
            or self.scaling == 0
        ):
            raise ConfigError("model.par_bn.scaling", f"must be a finite non-zero number; got {self.scaling!r}")
        choice("model.par_bn.activation", self.activation, ACTIVATIONS)
        choice("model.par_bn.dtype", self.dtype, DTYPES)
        if not is_all(self.layers):
            parse_layers(self.layers, None, "model.par_bn.layers")


@functools.cache
def layer_class():
    """The adapter's ``nn.Module`` (built on first use, so that reading configs needs no torch)."""
    import torch
    from torch import nn

    class ParallelBottleneck(nn.Module):
        """``scaling * up(act(down(x)))``; called by a forward hook on the MLP, which adds it to the MLP's output."""

        def __init__(self, dim: int, cfg: ParallelBottleneckConfig, device):
            super().__init__()
            dtype = getattr(torch, cfg.dtype)
            self.down = nn.Linear(dim, cfg.bottleneck, device=device, dtype=dtype)
            self.up = nn.Linear(cfg.bottleneck, dim, device=device, dtype=dtype)
            self.act = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}[cfg.activation]()
            self.scaling = cfg.scaling
            nn.init.zeros_(self.down.bias)  # down keeps nn.Linear's Kaiming-uniform draw (He et al.'s LoRA-style init)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.to(self.down.weight.dtype)
            return (self.up(self.act(self.down(h))) * self.scaling).to(x.dtype)

    return ParallelBottleneck


def _add_branch(mlp, inputs, output):
    return output + getattr(mlp, ATTRIBUTE)(inputs[0])


@register
class ParallelBottleneckKind(AdapterKind):
    name = "par_bn"
    config = ParallelBottleneckConfig
    title = "parallel bottleneck"
    order = 20  # after FFF (which wraps projections inside the MLP), before LoRA
    match_field = "bottleneck"
    hooks_mlp = True

    def owns(self, param: str) -> bool:
        return f".{ATTRIBUTE}." in param

    def inject(self, model, cfg: ParallelBottleneckConfig, shape, ctx: Injection):
        from fff_lightning.fff import decoder_layers

        layers = decoder_layers(model)
        cls = layer_class()
        for i in parse_layers(cfg.layers, len(layers), "model.par_bn.layers"):
            mlp = getattr(layers[i], "mlp", None)
            if mlp is None:
                raise ConfigError("model.par_bn.layers", f"decoder layer {i} has no MLP")
            if hasattr(mlp, ATTRIBUTE):
                raise ConfigError("model.par_bn", f"layer {i}'s MLP already carries a parallel adapter")
            device = next((p.device for p in mlp.parameters()), None)
            setattr(mlp, ATTRIBUTE, cls(shape.hidden_size, cfg, device))
            mlp.register_forward_hook(_add_branch)
        return model

    def legend(self, cfg: ParallelBottleneckConfig) -> str:
        return f"par_bn-b{cfg.bottleneck}"
