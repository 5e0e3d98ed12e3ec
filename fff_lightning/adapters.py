"""The adapters on a model: the one place that asks the adapter kinds (:mod:`fff_lightning.kinds`) which
parameters are adapters (it drives ``requires_grad``, counting and saving), puts them on a model in the kinds'
order, counts them on the meta device, and reads and writes adapter files.

An adapter file is a folder with ``adapter_model.safetensors`` (adapter tensors only) and
``fff_adapter_config.json`` (each kind's config, the base model's shape, the parameter counts).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from fff_lightning import kinds
from fff_lightning.errors import ConfigError
from fff_lightning.kinds import Injection
from fff_lightning.spec import CONFIG_NAME, WEIGHTS_NAME, AdapterSpec, Budget

#: The adapter-folder format this version writes and reads (other kinds than FFF and LoRA add their own key).
FORMAT_VERSION = 1
FLOAT_DTYPES = ("F32", "BF16", "F16")
_PEFT_PREFIX = "base_model.model."


def adapter_kind(name: str, spec: AdapterSpec | None = None) -> str | None:
    """The adapter kind (``"fff"``, ``"lora"``...) of a parameter name, ``None`` for a frozen base parameter;
    with ``spec``, among that run's kinds (DoRA's and LoRA's parameters are named alike)."""
    return spec.kind_of(name) if spec is not None else kinds.kind_of(name)


def is_adapter(name: str, spec: AdapterSpec | None = None) -> bool:
    """Whether a parameter is an adapter's: one of ``spec``'s kinds' where the run is known, else any kind's."""
    return adapter_kind(name, spec) is not None


def canonical_name(name: str) -> str:
    """A parameter name without PEFT's wrapper prefix, so files match with or without LoRA on top, and with a
    multimodal model's language model named as the text-only model (Gemma 3: ``model.language_model.layers`` ->
    ``model.layers``), so its adapters match the counts and files of its language model's config."""
    return name.removeprefix(_PEFT_PREFIX).replace("model.language_model.", "model.", 1)


def mark_only_adapters_trainable(model: nn.Module, spec: AdapterSpec | None = None) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = is_adapter(name, spec)


def count_parameters(model: nn.Module, spec: AdapterSpec | None = None) -> dict[str, int]:
    """Parameter counts: ``fff``, ``lora`` (and each other kind present), ``trainable`` (their sum) and ``base``
    (everything else). Give the run's ``spec`` where it has DoRA: without it, DoRA's parameters (named like
    LoRA's) count as ``lora``.

    On a 4-bit model ``base`` counts packed storage (half the real count); use the budget for the real shape.
    """
    counts = {"fff": 0, "lora": 0}
    base = 0
    for name, param in model.named_parameters():
        kind = adapter_kind(name, spec)
        if kind is None:
            base += param.numel()
        else:
            counts[kind] = counts.get(kind, 0) + param.numel()
    return {**counts, "trainable": sum(counts.values()), "base": base}


# -- putting adapters on a model ---------------------------------------------------------------------------------
def apply_adapters(spec: AdapterSpec, model: nn.Module, shape, add_lora=None):
    """Put ``spec``'s adapters on ``model`` in the kinds' order, one order that also works under Unsloth: FFF on
    the targeted projections, a parallel adapter beside the MLP, then LoRA or DoRA (naming the wrapped projections'
    inner layer, so its delta sees FFF's output), then the one trainable filter.

    Args:
        spec: which adapters.
        model: a loaded (or meta-device) causal LM, after any k-bit preparation.
        shape: its ``transformers`` config.
        add_lora: ``(model, lora, wrapped) -> model`` that adds LoRA (a backend may pass its own, as Unsloth's
            ``get_peft_model``); default: plain PEFT.

    Returns:
        ``(model, wrapped)``: the adapted model (a ``PeftModel`` with LoRA) and the FFF-wrapped modules' names.
    """
    spec.check(shape)
    ctx = Injection(add_lora=add_lora)
    for kind in spec.kinds():
        model = kind.inject(model, spec.configs[kind.name], shape, ctx)
    mark_only_adapters_trainable(model, spec)
    return model, ctx.wrapped


_META: dict[str, tuple[int, dict[str, tuple[int, ...]]]] = {}


def _on_meta(spec: AdapterSpec, shape) -> tuple[int, dict[str, tuple[int, ...]]]:
    """``(base parameters, {adapter tensor: shape})`` of ``spec`` on a meta-device model of ``shape``: no weight is
    loaded, downloaded or allocated (however large the adapters). Cached per spec and shape."""
    key = json.dumps([spec.to_dict(), shape.to_dict()], sort_keys=True, default=str)
    if key not in _META:
        from transformers import AutoModelForCausalLM

        spec.check(shape)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shape)
            base = sum(p.numel() for p in model.parameters())
            model, _ = apply_adapters(spec, model, shape)
        _META[key] = (
            base,
            {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters() if is_adapter(n, spec)},
        )
    return _META[key]


def count_adapters(spec: AdapterSpec, shape) -> Budget:
    """The adapters' parameter counts on a model of ``shape``, counted on the meta device."""
    base, shapes = _on_meta(spec, shape)
    counts = dict.fromkeys(spec.configs, 0)
    for name, dims in shapes.items():
        counts[adapter_kind(name, spec)] += math.prod(dims)
    return Budget(fff=counts.pop("fff", 0), lora=counts.pop("lora", 0), base=base, others=counts)


def adapter_shapes(spec: AdapterSpec, shape) -> dict[str, tuple[int, ...]]:
    """``{canonical name: shape}`` of every adapter tensor ``spec`` puts on a model of ``shape``."""
    return dict(_on_meta(spec, shape)[1])


def check_size(spec: AdapterSpec, shape) -> Budget:
    """Refuse adapters with more parameters than the base model they adapt (a typo such as a width of 10**9),
    before anything is allocated; returns their budget."""
    budget = count_adapters(spec, shape)
    if budget.trainable > budget.base:
        largest = max(budget.counts, key=budget.counts.get)
        knob = "width or n_sublayers" if largest == "fff" else kinds.get(largest).match_field
        raise ConfigError(
            f"model.{largest}",
            f"the adapters would have {budget.trainable:,} parameters, more than the base model's {budget.base:,}: "
            f"lower model.{largest}.{knob}",
        )
    return budget


# -- reading and writing adapter folders -------------------------------------------------------------------------
def read_spec(folder: str | Path) -> AdapterSpec:
    """The adapters an adapter folder (written by :func:`save_adapters`) holds, from its JSON."""
    config = read_adapter_config(folder)
    try:
        return AdapterSpec.from_dict(config)
    except ConfigError as e:
        raise ConfigError("adapter", f"{Path(folder) / CONFIG_NAME}: {e}") from None


def resolve_adapters(fff=None, lora=None, adapter_path: str | Path | None = None, **others) -> AdapterSpec:
    """The run's adapters from its config (each kind's section, ``None`` when absent) and, if given, a saved
    adapter folder, which then decides."""
    configs = {"fff": fff, "lora": lora, **others}
    return AdapterSpec.resolve(configs, read_spec(adapter_path) if adapter_path is not None else None)


def adapter_state_dict(model: nn.Module, spec: AdapterSpec | None = None) -> dict[str, torch.Tensor]:
    """The adapters' tensors (of ``spec``'s kinds where given), keyed by canonical name."""
    return {canonical_name(n): p.detach() for n, p in model.named_parameters() if is_adapter(n, spec)}


def save_adapters(
    model: nn.Module, folder: str | Path, fff=None, lora=None, base: dict | None = None, spec: AdapterSpec | None = None
) -> Path:
    """Write the adapters alone to ``folder``: safetensors weights and a readable JSON config.

    The folder is written beside its place and renamed into it, so an earlier export survives a crash or a full
    disk; adapters holding a NaN or an infinity are refused (:class:`NonFiniteAdapters`), never written.

    Args:
        model: the adapted model.
        folder: where to write; created if needed, replaced if it exists.
        fff: the :class:`~fff_lightning.spec.FFFConfig` used, or ``None``.
        lora: the :class:`~fff_lightning.spec.LoRAConfig` used, or ``None``.
        base: facts about the base model to check on load (``hidden_size``, ``num_hidden_layers``, ...).
        spec: the run's :class:`~fff_lightning.spec.AdapterSpec` (in place of ``fff`` and ``lora``: any kinds).
    """
    from safetensors.torch import save

    from fff_lightning.files import write_atomically

    spec = spec if spec is not None else AdapterSpec(fff, lora)
    unnamed = {adapter_kind(n) for n, _ in model.named_parameters()} - {None} - set(spec.configs)
    if spec.dora is not None:
        unnamed.discard("lora")  # DoRA's parameters are named like LoRA's
    if unnamed:
        unnamed = sorted(unnamed)
        raise ConfigError(
            "adapter", f"the model also carries {unnamed[0]} adapters, which fff/lora do not describe: pass spec="
        )
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, spec).items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteAdapters(f"{len(bad)} adapter tensor(s) hold NaN or infinity (e.g. {bad[0]}); not saved")
    counts = count_parameters(model, spec)
    config = {
        "format_version": FORMAT_VERSION,
        **spec.to_dict(),
        "base_model": base or {},
        "parameters": {k: v for k, v in counts.items() if k != "base"},
    }

    data = save(tensors, metadata={"format": "pt"})  # serialised here, written by Python: a full disk is an OSError

    def write(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(data)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_atomically(Path(folder), write, replace=True)


class NonFiniteAdapters(RuntimeError):
    """The adapters hold NaN or infinite values: the run diverged; they are not saved."""


def read_adapter_config(folder: str | Path) -> dict:
    """The JSON config of a saved adapter folder; a clear error if the folder is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file() or not (Path(folder) / WEIGHTS_NAME).is_file():
        raise ConfigError("adapter", f"{folder} is not an adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    if path.stat().st_size > 1 << 20:
        raise ConfigError("adapter", f"{path} is {path.stat().st_size:,} bytes, not an adapter config (a few KB)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError("adapter", f"{path} is corrupt ({reason}); export the adapters again") from None
    if not isinstance(config, dict):
        raise ConfigError("adapter", f"{path} is not an adapter config (a JSON object); export the adapters again")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ConfigError(
            "adapter",
            f"{path} has format_version {version!r}; this fff_lightning reads format {FORMAT_VERSION} (a newer or "
            "foreign file: export the adapters with this version)",
        )
    return config


def read_weights_header(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of the adapter file, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ConfigError("adapter", f"{path} is truncated or corrupt ({e}); export the adapters again") from None


def check_adapter_folder(folder: str | Path, expected: dict[str, tuple[int, ...]], shape) -> None:
    """Compare an adapter folder with the model it is meant for, before that model is built: its config's base
    model facts with ``shape``, its weights' header (names, shapes, dtypes) with ``expected``
    (``{canonical name: shape}`` of the adapters the config describes, counted on the meta device)."""
    config = read_adapter_config(folder)
    base = config.get("base_model") if isinstance(config.get("base_model"), dict) else {}
    for key in ("hidden_size", "num_hidden_layers"):
        if key in base and base[key] != getattr(shape, key):
            raise ConfigError(
                "adapter",
                f"{folder} was trained on a base model with {key} {base[key]}; this run's has {getattr(shape, key)}",
            )
    header = read_weights_header(folder)
    not_float = sorted(k for k, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES)
    if not_float:
        k = not_float[0]
        raise ConfigError(
            "adapter", f"{folder}: {len(not_float)} tensor(s) are not floating point (e.g. {k}: {header[k][0]})"
        )
    mismatch(folder, expected, {k: shape for k, (_, shape) in header.items()}, "the file", "the config")


def load_adapters(model: nn.Module, folder: str | Path) -> None:
    """Copy saved adapter weights into ``model``, which must already carry the same adapters.

    Raises :class:`ConfigError` naming missing, unexpected or mis-shaped tensors when the file does not match.
    """
    from safetensors.torch import load_file

    read_adapter_config(folder)
    read_weights_header(folder)
    try:
        saved = load_file(str(Path(folder) / WEIGHTS_NAME))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise ConfigError(
            "adapter", f"{Path(folder) / WEIGHTS_NAME} is truncated or corrupt ({e}); export the adapters again"
        ) from None
    params = {canonical_name(n): p for n, p in model.named_parameters() if is_adapter(n)}  # of any kind: all must match
    mismatch(folder, {k: tuple(p.shape) for k, p in params.items()}, {k: tuple(v.shape) for k, v in saved.items()})
    not_float = sorted(k for k, v in saved.items() if not v.dtype.is_floating_point)
    if not_float:
        raise ConfigError("adapter", f"{folder}: tensor {not_float[0]} is {saved[not_float[0]].dtype}, not floating")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))


def mismatch(where, expected: dict, got: dict, got_name: str = "the file", expected_name: str = "the model") -> None:
    """Raise one :class:`ConfigError` naming missing, unexpected and mis-shaped tensors, if ``got`` (``{name:
    shape}``) differs from ``expected``. Adapter files and checkpoints report mismatches through here."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    for what, keys in ((f"missing from {got_name}", missing), (f"not in {expected_name}", unexpected)):
        if keys:
            parts.append(f"{len(keys)} tensor(s) {what} (e.g. {keys[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatch(es) (e.g. {k}: {got_name.removeprefix('the ')} {tuple(got[k])}, "
            f"{expected_name.removeprefix('the ')} {tuple(expected[k])})"
        )
    field = "ckpt_path" if str(where).endswith(".ckpt") else "adapter"
    raise ConfigError(field, f"{where} does not match {expected_name}: " + "; ".join(parts))
