"""Print the parameter budget at fit start; stop an off-budget run before it trains."""

from __future__ import annotations

import logging

import lightning as L

from fff_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class ParameterBudget(L.Callback):
    """The guard for fair LoRA vs FFF comparisons.

    Args:
        target: the trainable-parameter count this run must match: a number, or the path of another run config
            whose budget is the target (e.g. the other side of the comparison). ``None``: only print.
        tolerance: allowed relative difference, e.g. ``0.07`` for 7%.
    """

    def __init__(self, target: int | str | None = None, tolerance: float = 0.01):
        self.target = target
        self.tolerance = tolerance
        self.counts: dict | None = None

    def _target(self) -> int | None:
        if self.target is None or isinstance(self.target, int):
            return self.target
        from fff_lightning.budget import run_budget
        from fff_lightning.run_config import load_model_spec

        spec = load_model_spec(self.target)
        return run_budget(spec.base, spec.fff, spec.lora).trainable

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from fff_lightning.adapters import count_parameters
        from fff_lightning.budget import count_budget

        counts = count_parameters(pl_module.model)
        base = (
            count_budget(pl_module.shape, pl_module.fff, pl_module.lora).base
            if (pl_module.fff or pl_module.lora)
            else 0
        )
        self.counts = {**counts, "base": base}
        target = self._target()
        lines = [f"FFF {counts['fff']:,}", f"LoRA {counts['lora']:,}", f"trainable {counts['trainable']:,}"]
        if base:
            lines.append(f"{counts['trainable'] / base:.3%} of the base model's {base:,}")
        if target:
            diff = (counts["trainable"] - target) / target
            lines.append(f"target {target:,} ({diff:+.2%}, tolerance {self.tolerance:.2%})")
        if trainer.is_global_zero:
            print("parameter budget: " + " | ".join(lines))
        for name, value in (
            ("budget/fff", counts["fff"]),
            ("budget/lora", counts["lora"]),
            ("budget/trainable", counts["trainable"]),
        ):
            for logger in trainer.loggers:
                logger.log_metrics({name: value}, step=0)
        if target and abs(counts["trainable"] - target) / target > self.tolerance:
            raise ConfigError(
                "trainer.callbacks.ParameterBudget",
                f"off budget: {counts['trainable']:,} trainable vs target {target:,} "
                f"({(counts['trainable'] - target) / target:+.2%}, tolerance {self.tolerance:.2%}); not training. "
                f"`python -m fff_lightning budget --match` finds a matching size",
            )
