"""FFF adapters on a Hugging Face causal LM, as fff_lightning trained them (self-contained: torch + transformers).

For each wrapped projection P (``up_proj``/``gate_proj`` of the listed decoder layers) and its N sub-layers:
x_{k+1} = x_k + d_k(act_k(g_k(RMSNorm_k(x_k))) * u_k(RMSNorm_k(x_k))); P sees x_N. LoRA is merged into the weights.
Written by ``python -m fff_lightning export``; loaded by ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.activations import ACT2FN

_Base = getattr(transformers, "__BASE_CLASS__")  # noqa: B009 (export fills in the base class)


class FFFRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class FFFSublayer(nn.Module):
    def __init__(self, dim: int, width: int, activation: str, eps: float):
        super().__init__()
        self.norm = FFFRMSNorm(dim, eps)
        self.g_proj = nn.Linear(dim, width, bias=False)
        self.u_proj = nn.Linear(dim, width, bias=False)
        self.d_proj = nn.Linear(width, dim, bias=False)
        self.act = ACT2FN[activation]

    def forward(self, h):
        n = F.rms_norm(h, (h.shape[-1],), self.norm.weight, self.norm.eps)
        return self.d_proj(self.act(self.g_proj(n)) * self.u_proj(n))


class FFFLinear(nn.Module):
    def __init__(self, base_proj: nn.Module, dim: int, widths, activations, eps: float):
        super().__init__()
        self.base_proj = base_proj
        self.fff_blocks = nn.ModuleList(FFFSublayer(dim, w, a, eps) for w, a in zip(widths, activations, strict=True))

    def forward(self, x):
        h = x.to(self.fff_blocks[0].norm.weight.dtype)
        for block in self.fff_blocks:
            h = h + block(h)
        return self.base_proj(h.to(x.dtype))


class FFFForCausalLM(_Base):
    _keep_in_fp32_modules = ["fff_blocks"]  # FFF kept in float32 (export writes [] for FFF trained in 16 bits)

    def __init__(self, config):
        super().__init__(config)
        spec = config.fff_adapter
        hidden = config.get_text_config().hidden_size  # a multimodal model's (Gemma 3) is its text model's
        inner = self.model
        while not hasattr(inner, "layers"):
            inner = inner.language_model if hasattr(inner, "language_model") else inner.model
        for i in spec["layers"]:
            mlp = inner.layers[i].mlp
            for t in spec["targets"]:
                wrapped = FFFLinear(getattr(mlp, t), hidden, spec["widths"], spec["activations"], spec["eps"])
                wrapped.fff_blocks.to(getattr(torch, spec["dtype"]))
                setattr(mlp, t, wrapped)
