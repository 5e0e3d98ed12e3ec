"""Ctrl-C and SIGTERM, at any moment of a run: before training nothing is left behind; during training a resumable
checkpoint and the adapters are saved at a step boundary; after the last step the run finishes its files."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import lightning as L
import torch

from fff_lightning.distributed import HostValue
from fff_lightning.errors import Interrupted

from .adapter_export import run_folder

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt(L.Callback):
    """What SIGINT (Ctrl-C) and SIGTERM do, by the run's phase:

    * **before training** (reading data, loading the model, the sanity check): stop at once with exit code 130 or
      143; nothing was trained, so nothing is saved and the run's unused folder is removed;
    * **training**: finish the current step (or the validation under way and the next step), save a checkpoint
      (``<run>/checkpoints/interrupted-step=<n>.ckpt``) and the adapters, and stop with 130 or 143 and the command
      that resumes. A second Ctrl-C stops at once, saving nothing (the last checkpoint stays);
    * **after the last step**: training is complete; the run writes its adapters and table and ends normally.

    With several processes a signal to any of them stops them all after the same step: the one after the step
    during which it came (the flag is shared without making any process wait), or that step itself when a
    validation or the end of training follows it.

    ``kill -9`` cannot be caught: it loses the work since the last checkpoint (``ModelCheckpoint``). The CLI adds
    this callback to every command and arms it (:meth:`arm`) before any data is read; in a ``Trainer`` built in
    Python it takes the signals from the start of training.

    Args:
        argv: the command's arguments (``["fit", "--config", ...]``), for the resume line; the CLI sets them.
    """

    def __init__(self, argv: list[str] | None = None):
        self.signum: int | None = None
        self.argv = argv
        self.phase = "before"  # before -> training -> after
        self._final = False  # the training step under way is the run's last
        self._previous: dict = {}
        self._trainer = None
        self._flag: HostValue | None = None  # several processes: the last step's sum of their flags

    # -- the handler ---------------------------------------------------------------------------------------------
    def arm(self) -> None:
        """Take SIGINT and SIGTERM from now on (kept until :meth:`disarm`)."""
        if not self._previous:
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.phase == "before":
            raise Interrupted(
                f"interrupted by {name} before training started: nothing was trained or saved, nothing to resume",
                signum,
                release=True,
            )
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise Interrupted(f"stopped at once by a second {name}: nothing saved since the last checkpoint",
                                  signum)  # fmt: skip
            return
        self.signum = signum
        if getattr(self, "_quiet", False):
            return
        trainer = self._trainer
        if trainer is not None and self.phase == "training" and not trainer.validating:
            running = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1  # the batch under way
            self._final = self._final or self._is_final(trainer, running)
        if self.phase == "after" or self._final:
            what = "training has finished" if self.phase == "after" else "this is the last training step"
            print(f"\n{name}: {what}; the run writes its adapters and table, then ends (Ctrl-C again stops at "
                  "once)", file=sys.stderr, flush=True)  # fmt: skip
            return
        if trainer is not None and trainer.validating:
            when = "after this validation and the next training step"
        elif getattr(self, "_world", 1) == 1:
            when = "after this step"
        else:
            when = "after this step or the next (all processes together)"
        print(f"\n{name}: saving a checkpoint {when} (Ctrl-C again stops at once, saving nothing)",
              file=sys.stderr, flush=True)  # fmt: skip

    @staticmethod
    def _is_final(trainer, batch_idx: int) -> bool:
        """Whether the training step starting now (batch ``batch_idx`` of its epoch) is the run's last."""
        if trainer.max_steps not in (None, -1) and trainer.global_step + 1 >= trainer.max_steps:
            return (batch_idx + 1) % max(trainer.accumulate_grad_batches, 1) == 0
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return bool(last_epoch and batch_idx + 1 >= trainer.num_training_batches)

    # -- Lightning's hooks ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._quiet = not trainer.is_global_zero  # one line per run, not one per process
        self._world = trainer.world_size
        self._trainer = trainer
        self._flag = None
        self._armed_here = not self._previous
        self.arm()  # a Trainer built in Python: from here; the CLI armed it before the data was read
        # Lightning put its own SIGTERM handler in front of this one when fit started; it would end the run with
        # its SIGTERMException (exit 0, no checkpoint) at the next step. During training only this one answers.
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self.phase = "training"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._final = self._is_final(trainer, batch_idx)

    def _stop_together(self, trainer, pl_module) -> bool:
        """Several processes: whether any of them got a signal. Each step adds up the processes' flags on the
        device (no barrier, no host sync) and, as a rule, reads the previous step's sum, which is long there, so
        nothing waits for the GPU. Before a validation or the end of training it reads this step's sum at once
        (one wait), so a signal never waits for a whole validation and is never lost at the last step. Every
        process reads the same sum at the same step, so they all stop after the same step."""
        flag = torch.full((), float(self.signum is not None), device=pl_module.device)
        torch.distributed.all_reduce(flag)  # Lightning's strategy.reduce would add a barrier: a host sync
        previous, self._flag = self._flag, HostValue(flag)
        if _pause_follows(trainer):
            return bool(self._flag.get() > 0)
        return previous is not None and bool(previous.get() > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._final:  # nothing is left to resume: a signal now lets the run finish its adapters and table
            self.phase = "after"
            return
        if trainer.world_size > 1:  # every process stops at the same step, even if only one got the signal
            stop = self._stop_together(trainer, pl_module)
        else:
            stop = self.signum is not None
        if not stop:
            return
        signum = self.signum or signal.SIGTERM
        _log_this_step(trainer)
        folder = run_folder(trainer, pl_module)
        ckpt = folder / "checkpoints" / f"interrupted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        saved = [f"checkpoint {ckpt}"]
        if hasattr(pl_module, "export_adapters") and trainer.is_global_zero:
            saved.append(f"adapters {pl_module.export_adapters(folder / 'adapter', global_step=trainer.global_step)}")
        resume = shlex.join(
            ["python", "-m", "fff_lightning", *resume_argv(self.argv or sys.argv[1:], folder.name, ckpt)]
        )
        trainer.strategy.barrier("interrupted")  # the other processes stop once the adapters are written
        raise Interrupted(
            f"interrupted by {signal.Signals(signum).name} at step {trainer.global_step}; saved "
            f"{' and '.join(saved)}. Resume with: {resume}",
            signum if trainer.is_global_zero else 0,  # the run's status is the first process's
        )

    def on_train_end(self, trainer, pl_module) -> None:
        self.phase = "after"

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if getattr(self, "_armed_here", False):
            self.disarm()
            self._armed_here = False


def _log_this_step(trainer) -> None:
    """Hand this step's logged values (its ``train/loss``) to the loggers now: Lightning does it right after this
    hook, which the interruption leaves, and the curve would miss the step."""
    connector = getattr(trainer, "_logger_connector", None)
    try:
        connector.on_batch_end()
        connector.update_train_step_metrics()
    except (AttributeError, AssertionError, TypeError):  # another Lightning: the step's point is missing, no more
        pass


def resume_argv(argv: list[str], run: str, ckpt: Path) -> list[str]:
    """The command's arguments to resume ``run`` from ``ckpt``: the old ``--ckpt_path``/``--run_name`` (either
    form, ``--opt value`` or ``--opt=value``) replaced by the new ones, so resuming a resumed run works too."""
    return [*_without(argv, ("--ckpt_path", "--run_name")), "--run_name", run, "--ckpt_path", str(ckpt)]


def _without(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (``--opt value`` or ``--opt=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in options)):
            out.append(a)
    return out


def _pause_follows(trainer) -> bool:
    """Whether a validation or the end of training (or of the epoch) follows this training step, by Lightning's
    own tests; on a Lightning whose loop lacks them, True (the flag is then read every step: one wait each)."""
    loop = trainer.fit_loop.epoch_loop
    try:
        if loop._is_training_done or loop.batch_progress.is_last_batch:
            return True
        if getattr(trainer, "_val_check_time_interval", None) is not None:
            return True  # validation by the clock: each process has its own clock, so read every step alike
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except AttributeError:
        return True
