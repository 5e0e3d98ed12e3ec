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
    during which it came (the flag is shared without making any process wait).

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
        print(f"\n{name}: saving a checkpoint after this step (Ctrl-C again stops at once, saving nothing)",
              file=sys.stderr, flush=True)  # fmt: skip

    def _stop_together(self, trainer, pl_module) -> bool:
        """Several processes: whether any of them got a signal by the end of the previous step. Each step adds up
        this process's flag on the device and reads the previous step's sum, which is long there, so nothing
        waits for the GPU; every process reads the same sum at the same step and they all stop after it."""
        flag = torch.tensor(float(self.signum is not None), device=pl_module.device)
        previous, self._flag = self._flag, HostValue(trainer.strategy.reduce(flag, reduce_op="sum"))
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
