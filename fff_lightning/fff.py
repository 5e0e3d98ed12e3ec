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

import torch
import torch.nn.functional as F
from torch import nn

from fff_lightning.checks import parse_layers
from fff_lightning.errors import ConfigError

# The kind's config, checks and constants are fff_lightning.kinds.fff (no torch); this module is the layer.
__all__ = ["FFFLinear", "FFFSublayer", "decoder_layers", "fff_stack", "inject_fff"]
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def __init__(self, base_proj: nn.Module, dim: int, cfg, eps: float, chunks: int = 4):
        """``cfg``: the ``model.fff`` config (:class:`fff_lightning.kinds.fff.FFFConfig`); ``chunks``: token chunks
        of a recomputed stack. The wrapped projection is ``base_proj`` (``kinds.fff.INNER``: LoRA names it)."""
        super().__init__()
        self.base_proj = base_proj
        dtype = TORCH_DTYPES[cfg.dtype]
        device = _device_of(base_proj)
        self.fff_blocks = nn.ModuleList(
            FFFSublayer(dim, w, a, eps) for w, a in zip(cfg.widths(), cfg.activations(), strict=True)
        )
        for block in self.fff_blocks:
            block.reset_parameters(cfg.init, cfg.init_std)
        self.fff_blocks.to(device=device, dtype=dtype)
        self.eps = eps
        self.compiled = False
        self.recompute = False
        self.chunks = chunks

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``x_N``: the input the wrapped projection sees, in ``x``'s dtype.

        With ``recompute`` (the memory plan's "FFF stacks recomputed"), a step that builds gradients keeps only the
        stack's input: backward recomputes the stack in ``chunks`` chunks of tokens, one at a time, so it
        holds a chunk's activations, not the stack's. Every token's computation is the same either way.
        """
        blocks = self.fff_blocks
        run = compiled_fff_stack() if self.compiled else fff_stack
        weights, acts, dtype = [b.weights() for b in blocks], tuple(b.act for b in blocks), blocks[0].norm.weight.dtype

        def stack(part: torch.Tensor) -> torch.Tensor:
            return run(part.to(dtype), weights, acts, self.eps).to(x.dtype)

        if not (self.recompute and torch.is_grad_enabled()):
            return stack(x)
        from torch.utils.checkpoint import checkpoint

        parts = x.chunk(self.chunks, dim=-2)  # (..., tokens, d): chunks of tokens
        return torch.cat([checkpoint(stack, p, use_reentrant=False) for p in parts], dim=-2)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_proj(self.transform(x), *args, **kwargs)


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (possibly PEFT-wrapped) causal LM of :data:`~fff_lightning.architectures.SUPPORTED`."""
    inner = model
    # PeftModel -> LoraModel -> CausalLM -> MistralModel; a multimodal model's language model (Gemma 3)
    for attr in ("base_model", "model", "language_model"):
        while hasattr(inner, attr) and not hasattr(inner, "layers"):
            nxt = getattr(inner, attr)
            if nxt is inner:
                break
            inner = nxt
    if not hasattr(inner, "layers"):
        raise TypeError(f"cannot find decoder layers in {type(model).__name__}")
    return inner.layers


def inject_fff(model: nn.Module, cfg, hidden_size: int, eps: float = 1e-5, chunks: int = 4) -> list[str]:
    """Wrap the targeted projections of the chosen decoder layers with :class:`FFFLinear`, in place.

    Returns the wrapped modules' names (``model.layers.13.mlp.up_proj``...). Raises :class:`ConfigError` when a
    layer or projection does not exist. Call it before LoRA (see :mod:`fff_lightning.kinds.lora`); ``cfg`` is the
    ``model.fff`` config (:class:`fff_lightning.kinds.fff.FFFConfig`).
    """
    layers = decoder_layers(model)
    idx = parse_layers(cfg.layers, len(layers), "model.fff.layers")
    eps = cfg.eps if cfg.eps is not None else eps
    wrapped = []
    for i in idx:
        mlp = layers[i].mlp
        for t in cfg.targets:
            proj = getattr(mlp, t, None)
            if proj is None:
                raise ConfigError("model.fff.targets", f"decoder layer {i} has no MLP projection {t!r}")
            if isinstance(proj, FFFLinear):
                raise ConfigError("model.fff.targets", f"layer {i} {t} already carries an FFF adapter")
            setattr(mlp, t, FFFLinear(proj, hidden_size, cfg, eps, chunks))
            wrapped.append(f"layers.{i}.mlp.{t}")
    return wrapped
