"""Read the adapter part of a run's YAML config (the ``model:`` section LightningCLI uses) without Lightning.

Commands that only need the model's description (``budget``) read configs through here, fast and with the
same dataclasses, defaults and checks as training.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.fff import FFFConfig
from fff_lightning.loading import BaseModelConfig
from fff_lightning.lora import LoRAConfig


def from_dict(cls, data, prefix: str):
    """Build dataclass ``cls`` from a mapping, naming unknown fields with their dotted path."""
    if data is None:
        return None
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"expected a mapping of {cls.__name__} fields; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", f"unknown field; allowed: {', '.join(names)}")
        hint = hints[key]
        kwargs[key] = from_dict(hint, value, f"{prefix}.{key}") if dataclasses.is_dataclass(hint) else value
    try:
        return cls(**kwargs)
    except ConfigError as e:  # name the field by its full path in the YAML (model.fff.width)
        parent, _, last = prefix.rpartition(".")
        if parent and e.field.split(".")[0] == last:
            raise ConfigError(f"{parent}.{e.field}", e.message) from None
        raise
    except TypeError as e:  # e.g. a comparison of a str with an int inside validation
        raise ConfigError(prefix, str(e)) from e


@dataclass
class ModelSpec:
    """The model part of a run: base model and adapters."""

    base: BaseModelConfig
    fff: FFFConfig | None
    lora: LoRAConfig | None


def model_section(config: dict) -> dict:
    model = config.get("model") or {}
    if isinstance(model, dict) and "init_args" in model:  # LightningCLI's class_path/init_args form
        model = model["init_args"] or {}
    return model


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError("config", f"no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return data


def load_model_spec(path: str | Path) -> ModelSpec:
    """The base model and adapters that the run config at ``path`` describes."""
    model = model_section(read_yaml(path))
    base = from_dict(BaseModelConfig, model.get("base") or {}, "model.base")
    fff = from_dict(FFFConfig, model.get("fff"), "model.fff")
    lora = from_dict(LoRAConfig, model.get("lora"), "model.lora")
    if fff is None and lora is None:
        raise ConfigError("model", f"{path} configures no adapter: give model.fff, model.lora, or both")
    return ModelSpec(base, fff, lora)
