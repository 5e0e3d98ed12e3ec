"""Ctrl-C and SIGTERM save a resumable checkpoint and the adapters, then stop with a line that says how to resume."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import lightning as L
import torch

from fff_lightning.distributed import HostValue
from fff_lightning.errors import Interrupted


class GracefulInterrupt(L.Callback):
    """On the first SIGINT (Ctrl-C) or SIGTERM, finish the current training step, save a checkpoint
    (``<run>/checkpoints/interrupted-step=<n>.ckpt``) and the adapters, and stop with exit code 130 or 143 and the
    command that resumes. A second Ctrl-C stops at once, saving nothing (the last checkpoint stays).

    With several processes a signal to any of them stops them all after the same step: the one after the step
    during which it came (the flag is shared without making any process wait), or that step itself when a
    validation or the end of training follows it.

    ``kill -9`` cannot be caught: it loses the work since the last checkpoint (``ModelCheckpoint``). The CLI adds
    this callback to every ``fit``.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self.argv: list[str] | None = None  # the command's arguments, for the resume line (the CLI sets them)
        self._flag: HostValue | None = None  # several processes: the last step's sum of their flags

    def on_train_start(self, trainer, pl_module) -> None:
        self._quiet = not trainer.is_global_zero  # one line per run, not one per process
        self._world = trainer.world_size
        self._flag = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: stop now
        self.signum = signum
        if getattr(self, "_quiet", False):
            return
        name = signal.Signals(signum).name
        when = "this step" if getattr(self, "_world", 1) == 1 else "this step or the next (all processes together)"
        print(f"\n{name}: saving a checkpoint after {when} (Ctrl-C again stops at once, saving nothing)",
              file=sys.stderr, flush=True)  # fmt: skip

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
        if trainer.world_size > 1:  # every process stops at the same step, even if only one got the signal
            stop = self._stop_together(trainer, pl_module)
        else:
            stop = self.signum is not None
        if not stop:
            return
        signum = self.signum or signal.SIGTERM
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        ckpt = folder / "checkpoints" / f"interrupted-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        saved = [f"checkpoint {ckpt}"]
        if hasattr(pl_module, "export_adapters") and trainer.is_global_zero:
            saved.append(f"adapters {pl_module.export_adapters(folder / 'adapter', global_step=trainer.global_step)}")
        argv = [a for a in sys.argv[1:] if not a.startswith("--ckpt_path")]
        resume = shlex.join(
            ["python", "-m", "fff_lightning", *argv, "--run_name", folder.name, "--ckpt_path", str(ckpt)]
        )
        trainer.strategy.barrier("interrupted")  # the other processes stop once the adapters are written
        raise Interrupted(
            f"interrupted by {signal.Signals(signum).name} at step {trainer.global_step}; saved "
            f"{' and '.join(saved)}. Resume with: {resume}",
            signum if trainer.is_global_zero else 0,  # the run's status is the first process's
        )

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


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
