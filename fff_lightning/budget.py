"""Trainable-parameter budgets, counted on the real model shape without loading a weight.

The base model is built on PyTorch's ``meta`` device (shapes, no storage), the adapters are put on it exactly
as :func:`fff_lightning.loading.build_model` does, and :func:`fff_lightning.adapters.count_parameters` counts.
Mistral-7B's shape is known offline, so a budget takes seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from fff_lightning.errors import ConfigError
from fff_lightning.spec import AdapterSpec, BaseModelConfig, Budget, FFFConfig, LoRAConfig

__all__ = ["Budget", "Match", "count_budget", "match_fff_width", "match_kind", "match_lora_rank", "run_budget"]


def count_budget(shape, fff: FFFConfig | None, lora: LoRAConfig | None) -> Budget:
    """Count the adapters of a run on a meta-device model of ``shape`` (a ``transformers`` config)."""
    from fff_lightning.adapters import count_adapters

    return count_adapters(AdapterSpec(fff, lora), shape)


def run_budget(base: BaseModelConfig, fff: FFFConfig | None, lora: LoRAConfig | None) -> Budget:
    return count_budget(base.shape(), fff, lora)


@dataclass
class Match:
    """The other side of a fair comparison: ``field`` set to ``value`` gives ``budget``, closest to ``target``."""

    field: str
    value: int
    budget: Budget
    target: int

    @property
    def difference(self) -> int:
        return self.budget.trainable - self.target


def config_adapters(path: str) -> AdapterSpec:
    """The adapters a run config file describes, read from its ``model`` section alone: each adapter kind's section
    and ``adapter_path`` (the folder then decides), as ``fit`` reads them, with no parser, module or Trainer built."""
    import yaml

    from fff_lightning import config_files, kinds
    from fff_lightning.adapters import resolve_adapters

    file = config_files.path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError("config", f"cannot read {file}: {e}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError("model", f"{file} has no model section (a run config, as fit takes it)")
    try:
        return resolve_adapters(adapter_path=model.get("adapter_path"), **{k: model.get(k) for k in kinds.names()})
    except (TypeError, ValueError, ConfigError):  # a value YAML alone does not type (e.g. 1e-2 read as a string)
        from fff_lightning.run_config import describe_run

        return describe_run(file).model.adapters  # the full parser's reading, which types it or says what is wrong


def config_budget(path: str, shape, field: str) -> int:
    """Trainable parameters of the adapters another run config describes, counted on ``shape`` (this run's base
    model): the other side of a comparison, on the same base. An error in it names ``field`` and the config."""
    from fff_lightning.adapters import count_adapters

    try:
        return count_adapters(config_adapters(path), shape).trainable
    except ConfigError as e:
        raise ConfigError(field, f"{path}: {e}") from e


def _closest_int(f, target: int) -> int:
    """Counts are affine in a rank or width: solve from two exact counts, then check the neighbours."""
    c1, c2 = f(1), f(2)
    slope, offset = c2 - c1, c1 - (c2 - c1)
    if slope <= 0:
        raise ConfigError("match", "the count does not grow with the matched size")
    guess = max(1, round((target - offset) / slope))
    return min({max(1, guess - 1), guess, guess + 1}, key=lambda v: (abs(offset + slope * v - target), v))


def match_kind(shape, target: int, spec: AdapterSpec | None, name: str) -> Match:
    """The run whose adapter kind ``name`` is sized (its ``match_field``: LoRA's and DoRA's rank, FFF's width, the
    parallel adapter's bottleneck) so that its trainable count is closest to ``target``. A kind matched alone (a
    baseline: LoRA, DoRA, par_bn) starts from ``spec``'s section of it, else its defaults; FFF is matched with
    ``spec``'s other adapters as given (step 2's question)."""
    from fff_lightning import kinds
    from fff_lightning.adapters import count_adapters

    kind = kinds.get(name)
    if kind.match_field is None:
        raise ConfigError("--match", f"the {name} kind has no size to match")
    current = spec.configs.get(name) if spec is not None else None
    if kind.match_alone:
        template = current if current is not None else kind.default()

        def run(v: int) -> AdapterSpec:
            return AdapterSpec(**{name: kind.with_size(template, v)})
    else:
        if current is None:
            raise ConfigError(f"model.{name}", f"--match {name} needs a run with a {name} section")

        def run(v: int) -> AdapterSpec:
            return AdapterSpec(**{**spec.configs, name: kind.with_size(current, v)})

    v = _closest_int(lambda v: count_adapters(run(v), shape).trainable, target)
    return Match(f"{name}.{kind.match_field}", v, count_adapters(run(v), shape), target)


def match_lora_rank(shape, target: int, lora: LoRAConfig | None = None) -> Match:
    """The LoRA-only run (modules/layers of ``lora``, default all seven linear modules of every layer) whose
    trainable count is closest to ``target``. Alpha keeps the research's ratio r/2 unless ``lora`` fixes it."""
    return match_kind(shape, target, AdapterSpec(lora=lora) if lora is not None else None, "lora")


def match_fff_width(shape, target: int, fff: FFFConfig, lora: LoRAConfig | None = None) -> Match:
    """The uniform FFF width (other FFF fields and any LoRA as given) whose run total is closest to ``target``."""
    return match_kind(shape, target, AdapterSpec(fff, lora), "fff")
