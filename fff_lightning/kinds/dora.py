"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): LoRA whose update also learns each output
row's magnitude, through PEFT's ``use_dora``. A peer the FFF study compares against, as one module.

``model.dora`` takes LoRA's fields (``r``, ``alpha``, ``target_modules``, ``layers``...; alpha r/2 by default). It
cannot share a model with ``model.lora`` (both are PEFT LoRA layers); it goes on after FFF, like LoRA, and adapts
what FFF feeds. ``budget --match dora`` gives the DoRA-alone run of a budget (its rank). It is added with plain
PEFT on every backend (not Unsloth's own LoRA path), and the memory plan is not calibrated for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fff_lightning.kinds import Injection, register
from fff_lightning.kinds.lora import LoRAConfig, LoRAKind, apply_lora


@dataclass
class DoRAConfig(LoRAConfig):
    """What DoRA adapter to build: LoRA's fields (``preset``, ``r``, ``alpha``, ``dropout``, ``target_modules``,
    ``layers``, ``use_rslora``), with PEFT's ``use_dora``: the magnitude of each adapted output row trains too."""

    _field = "model.dora"


@register
class DoRAKind(LoRAKind):
    name = "dora"
    config = DoRAConfig
    title = "DoRA"
    order = 31  # beside LoRA's 30: a parameter named like both is LoRA's where no run says otherwise
    excludes = ("lora",)
    planned_in_memory = False

    def owns(self, param: str) -> bool:
        return ".lora_" in param  # lora_A, lora_B and lora_magnitude_vector

    def inject(self, model, cfg: DoRAConfig, shape, ctx: Injection):
        return apply_lora(model, cfg, shape.num_hidden_layers, ctx.wrapped, use_dora=True)

    def legend(self, cfg: DoRAConfig) -> str:
        return f"dora-r{cfg.rank}"
