"""Faults injected into real `fit` runs (importable by a `fit` subprocess: PYTHONPATH=tests)."""

import os
import signal

import lightning as L
import torch


class SignalAtStep(L.Callback):
    """Send this process a real signal when training step ``step`` (counted from 1) starts; with several
    processes, only the process of global rank ``rank`` (all of them if ``None``)."""

    def __init__(self, step: int, signum: str = "SIGINT", rank: int | None = None):
        self.step = step
        self.signum = getattr(signal, signum)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class NaNAtStep(L.Callback):
    """Make one adapter weight NaN before training step ``step`` (counted from 1): that step's loss is NaN. With
    ``transient`` the weight is restored before the optimizer step, so only that step's gradients are NaN."""

    def __init__(self, step: int, transient: bool = False):
        self.step = step
        self.transient = transient
        self.saved = None

    def _weight(self, pl_module):
        return next(p for n, p in pl_module.model.named_parameters() if "fff_blocks" in n)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            with torch.no_grad():
                self.saved = self._weight(pl_module).clone()
                self._weight(pl_module).fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.transient and self.saved is not None:
            with torch.no_grad():
                self._weight(pl_module).copy_(self.saved)
            self.saved = None


class SignalAtHook(L.Callback):
    """Send this process a real signal when a Lightning hook runs (``on_sanity_check_start``,
    ``on_validation_start``...); with ``after_step``, only once training has made that many steps."""

    def __init__(self, hook: str, signum: str = "SIGINT", after_step: int = 0):
        self.signum = getattr(signal, signum)
        self.after_step = after_step
        self.sent = False
        setattr(self, hook, self._send)

    def _send(self, trainer, *args, **kwargs):
        if not self.sent and trainer.global_step >= self.after_step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class FailForSeed(L.Callback):
    """Fail the run whose ``model.seed`` is ``seed`` as training starts (a sweep's one bad seed)."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.seed == self.seed:
            raise RuntimeError(f"planted failure for seed {self.seed}")


class FailAtStep(L.Callback):
    """Fail with an error this tool does not know (a bug, a device error) after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"planted failure at step {trainer.global_step}")
