"""Unsloth's fused LoRA matmuls for the MLPs that carry FFF (unsloth backend only).

Unsloth runs a decoder layer's whole MLP as one fused LoRA function that feeds ``gate_proj`` and ``up_proj`` the
same input, so it declines the layers where FFF changes one projection's input; those then run PEFT's LoRA
modules, many small operations each, and the step becomes bound by the CPU launching them. Here each projection
of such an MLP runs Unsloth's single-projection fused function instead (``LoRA_W``: dequantise, base matmul and
LoRA in one autograd function, as Unsloth does for ``o_proj``), with FFF's stack transforming the wrapped
projections' input first: ``down(act(gate(x or x_N)) * up(x_N or x))``. Same function, fewer operations.

The forward is set on each such MLP instance; no class is patched.
"""

from __future__ import annotations

import types

from torch import nn

from fff_lightning.fff import FFFLinear, decoder_layers


def _plain_lora(proj: nn.Module) -> bool:
    """A PEFT LoRA layer with one adapter, no dropout, no DoRA and no bias: what ``LoRA_W`` computes exactly."""
    lora_a = getattr(proj, "lora_A", None)
    if lora_a is None or list(lora_a.keys()) != ["default"] or getattr(proj, "merged", False):
        return False
    if getattr(proj, "use_dora", {}).get("default") or getattr(proj, "lora_bias", {}).get("default"):
        return False
    if not isinstance(proj.lora_dropout["default"], nn.Identity):
        return False
    return getattr(proj.get_base_layer(), "bias", None) is None


def _fused_mlp_forward(self, x):
    from unsloth.kernels.fast_lora import LoRA_W, get_lora_parameters

    def project(module: nn.Module, inp):
        if isinstance(module, FFFLinear):
            inp, module = module.transform(inp), module.base_proj
        return LoRA_W.apply(inp, *get_lora_parameters(module))

    return project(self.down_proj, self.act_fn(project(self.gate_proj, x)) * project(self.up_proj, x))


def fuse_fff_mlps(model: nn.Module) -> list[int]:
    """Give every FFF-carrying MLP whose projections are plain LoRA layers the fused forward; returns their layers."""
    fused = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        projs = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not any(isinstance(p, FFFLinear) for p in projs):
            continue
        inner = [p.base_proj if isinstance(p, FFFLinear) else p for p in projs]
        if all(p is not None and _plain_lora(p) for p in inner):
            mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
            fused.append(i)
    return fused
