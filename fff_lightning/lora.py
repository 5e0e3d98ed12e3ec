"""LoRA through PEFT, kept under this name for the Python API: the kind itself is :mod:`fff_lightning.kinds.lora`."""

from fff_lightning.kinds.lora import ALL_LINEAR, LORA_PRESETS, LoRAConfig, apply_lora, peft_kwargs, target_regex

__all__ = ["ALL_LINEAR", "LORA_PRESETS", "LoRAConfig", "apply_lora", "peft_kwargs", "target_regex"]
