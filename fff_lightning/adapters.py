"""The one place that knows which parameters are adapters: it drives ``requires_grad``, counting and saving.

An adapter file is a folder with ``adapter_model.safetensors`` (adapter tensors only) and
``fff_adapter_config.json`` (the FFF and LoRA configs, the base model's shape, the parameter counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fff_lightning.errors import ConfigError
from fff_lightning.spec import FFF_PREFIX, AdapterSpec

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "fff_adapter_config.json"
ADAPTER_KINDS = ("fff", "lora")
_PEFT_PREFIX = "base_model.model."


def adapter_kind(name: str) -> str | None:
    """``"fff"``, ``"lora"`` or ``None`` (a frozen base parameter) for a parameter name."""
    if f".{FFF_PREFIX}." in name or name.startswith(f"{FFF_PREFIX}."):
        return "fff"
    if ".lora_" in name:
        return "lora"
    return None


def is_adapter(name: str) -> bool:
    return adapter_kind(name) is not None


def canonical_name(name: str) -> str:
    """A parameter name without PEFT's wrapper prefix, so files match with or without LoRA on top."""
    return name.removeprefix(_PEFT_PREFIX)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter(name)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``fff``, ``lora``, ``trainable`` (their sum) and ``base`` (everything else).

    On a 4-bit model ``base`` counts packed storage (half the real count); use the budget for the real shape.
    """
    counts = dict.fromkeys((*ADAPTER_KINDS, "base"), 0)
    for name, param in model.named_parameters():
        counts[adapter_kind(name) or "base"] += param.numel()
    counts["trainable"] = counts["fff"] + counts["lora"]
    return counts


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed by canonical name."""
    return {canonical_name(n): p.detach() for n, p in model.named_parameters() if is_adapter(n)}


def save_adapters(model: nn.Module, folder: str | Path, fff=None, lora=None, base: dict | None = None) -> Path:
    """Write the adapters alone to ``folder``: safetensors weights and a readable JSON config.

    The folder is written beside its place and renamed into it, so an earlier export survives a crash or a full
    disk; adapters holding a NaN or an infinity are refused (:class:`NonFiniteAdapters`), never written.

    Args:
        model: the adapted model.
        folder: where to write; created if needed, replaced if it exists.
        fff: the :class:`~fff_lightning.spec.FFFConfig` used, or ``None``.
        lora: the :class:`~fff_lightning.spec.LoRAConfig` used, or ``None``.
        base: facts about the base model to check on load (``hidden_size``, ``num_hidden_layers``, ...).
    """
    from safetensors.torch import save_file

    from fff_lightning.files import write_atomically

    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteAdapters(f"{len(bad)} adapter tensor(s) hold NaN or infinity (e.g. {bad[0]}); not saved")
    counts = count_parameters(model)
    config = {
        "format_version": 1,
        **AdapterSpec(fff, lora).to_dict(),
        "base_model": base or {},
        "parameters": {k: counts[k] for k in (*ADAPTER_KINDS, "trainable")},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_atomically(Path(folder), write, replace=True)


class NonFiniteAdapters(RuntimeError):
    """The adapters hold NaN or infinite values: the run diverged; they are not saved."""


def read_adapter_config(folder: str | Path) -> dict:
    """The JSON config of a saved adapter folder; a clear error if the folder is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        raise ConfigError("adapter", f"{folder} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError("adapter", f"{path} is corrupt ({e}); export the adapters again") from None
    if not isinstance(config, dict):
        raise ConfigError("adapter", f"{path} is not an adapter config (a JSON object); export the adapters again")
    return config


def load_adapters(model: nn.Module, folder: str | Path) -> None:
    """Copy saved adapter weights into ``model``, which must already carry the same adapters.

    Raises :class:`ConfigError` naming missing, unexpected or mis-shaped tensors when the file does not match.
    """
    from safetensors.torch import load_file

    read_adapter_config(folder)
    try:
        saved = load_file(str(Path(folder) / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ConfigError(
            "adapter", f"{Path(folder) / WEIGHTS_NAME} is truncated or corrupt ({e}); export the adapters again"
        ) from None
    params = {canonical_name(n): p for n, p in model.named_parameters() if is_adapter(n)}
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = sorted(k for k in set(saved) & set(params) if saved[k].shape != params[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing from the file", missing), ("not in the model", unexpected)):
            if keys:
                parts.append(f"{len(keys)} tensor(s) {what} (e.g. {keys[0]})")
        if wrong:
            k = wrong[0]
            file_shape, model_shape = tuple(saved[k].shape), tuple(params[k].shape)
            parts.append(f"{len(wrong)} shape mismatch(es) (e.g. {k}: file {file_shape}, model {model_shape})")
        raise ConfigError("adapter", f"{folder} does not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))
