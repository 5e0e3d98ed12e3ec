"""LoRA through PEFT, composed with FFF in the order that also works under Unsloth.

Order (kept by :meth:`fff_lightning.spec.AdapterSpec.apply`): load (4-bit) -> k-bit preparation ->
:func:`fff_lightning.fff.inject_fff` -> :func:`apply_lora`. LoRA's ``target_modules`` is a regex that names the
*inner* projection of FFF-wrapped layers (``...mlp.up_proj.base_proj``), so the LoRA delta on ``up_proj`` also
sees FFF's output; the wrappers themselves are excluded (PEFT cannot wrap them).
"""

from __future__ import annotations

from torch import nn

from fff_lightning.spec import ALL_LINEAR, INNER, LORA_PRESETS, LoRAConfig, parse_layers

__all__ = ["ALL_LINEAR", "LORA_PRESETS", "LoRAConfig", "apply_lora", "peft_kwargs", "target_regex"]
_BLOCK_OF = {m: "self_attn" for m in ALL_LINEAR[:4]} | {m: "mlp" for m in ALL_LINEAR[4:]}


def target_regex(cfg: LoRAConfig, n_layers: int) -> str:
    """A PEFT ``target_modules`` regex for the chosen modules and layers, FFF's inner projection included."""
    idx = parse_layers(cfg.layers, n_layers, "model.lora.layers")
    layer_alt = r"\d+" if len(idx) == n_layers else "|".join(map(str, idx))
    blocks = sorted({_BLOCK_OF[m] for m in cfg.target_modules})
    # never a vision tower's layers (a multimodal model's encoder names its attention projections alike)
    return (
        rf"(?!.*vision).*\.layers\.({layer_alt})\.({'|'.join(blocks)})\.({'|'.join(cfg.target_modules)})(\.{INNER})?$"
    )


def peft_kwargs(cfg: LoRAConfig, n_layers: int, wrapped: list[str]) -> dict:
    """Arguments shared by ``peft.LoraConfig`` and Unsloth's ``get_peft_model``."""
    return dict(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg, n_layers),
        # FFF wrappers match the regex by name but are not layers PEFT can wrap; their inner projection is.
        exclude_modules=list(wrapped) or None,
        bias="none",
        use_rslora=cfg.use_rslora,
    )


def apply_lora(model: nn.Module, cfg: LoRAConfig, n_layers: int, wrapped: list[str]) -> nn.Module:
    """Add LoRA with plain PEFT; returns the ``PeftModel``. ``wrapped`` is what ``inject_fff`` returned."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", **peft_kwargs(cfg, n_layers, wrapped))
    return get_peft_model(model, config, autocast_adapter_dtype=True)
