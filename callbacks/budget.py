"""Print the parameter budget before anything loads; refuse an off-budget run before it costs anything."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from fff_lightning.errors import ConfigError


class ParameterBudget(L.Callback):
    """The guard for fair LoRA vs FFF comparisons.

    It counts the run's adapters on the meta device (no weight loaded) in its ``preflight``, which the CLI runs
    before any data is tokenized or any weight loaded (runs started from Python reach it in ``setup``, before the
    model loads), prints the budget, logs it, and stops an off-budget run there.

    Args:
        target: the trainable-parameter count this run must match: a number, or the path of another run config
            whose adapters' budget on this run's base model is the target (e.g. the other side of the comparison). A
            relative path is looked up next to the config that names it, then in the working directory. ``None``:
            only print.
        tolerance: allowed relative difference, e.g. ``0.07`` for 7%.
    """

    def __init__(self, target: int | str | None = None, tolerance: float = 0.01):
        self.target = target
        self.tolerance = tolerance
        self.budget = None

    def _target(self, shape) -> int | None:
        if self.target is None or isinstance(self.target, int):
            return self.target
        from fff_lightning.budget import config_budget

        # the other run's adapters on this run's base model: a comparison is fair on one base
        return config_budget(self.target, shape, "trainer.callbacks.ParameterBudget.target")

    def preflight(self, trainer: L.Trainer, module) -> None:
        """Print and log the run's budget (counted once, in the run's plan); raise :class:`ConfigError` if it is off
        the target."""
        from fff_lightning import kinds

        b = self.budget = module.plan.budget
        target = self._target(module.base_shape())
        shown = list(b.counts) if {"fff", "lora"} & set(module.adapters.configs) else list(module.adapters.configs)
        lines = [f"{kinds.get(k).title} {b.counts.get(k, 0):,}" for k in shown] + [f"trainable {b.trainable:,}"]
        lines.append(f"{b.share:.3%} of the base model's {b.base:,}")
        source = f", {Path(self.target).name}'s adapters on this base model" if isinstance(self.target, str) else ""
        if target:
            lines.append(
                f"target {target:,} ({(b.trainable - target) / target:+.2%}, tolerance {self.tolerance:.2%}{source})"
            )
        if trainer.is_global_zero:
            print("parameter budget: " + " | ".join(lines))
        for logger in trainer.loggers:
            logger.log_metrics({**{f"budget/{k}": n for k, n in b.counts.items()}, "budget/trainable": b.trainable},
                               step=0)  # fmt: skip
        if target and abs(b.trainable - target) / target > self.tolerance:
            raise ConfigError(
                "trainer.callbacks.ParameterBudget",
                f"off budget: {b.trainable:,} trainable vs target {target:,} "
                f"({(b.trainable - target) / target:+.2%}, tolerance {self.tolerance:.2%}{source}); not training. "
                "`python -m fff_lightning budget --match` finds a matching size (a smoke test needs no guard: leave "
                "ParameterBudget out of trainer.callbacks)",
            )
