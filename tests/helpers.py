"""What several test files read from a run: its logged losses, its adapter weights; and the environment for runs
started as subprocesses (which import ``faults`` from this folder)."""

import os
from pathlib import Path

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # `faults` for the subprocesses
QUICK = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")


def quick_args(logs, *extra, steps: int, command: str = "fit") -> list[str]:
    """The command line of a short tiny-model run into ``logs``: logging every step, no progress bar or model
    summary; ``extra`` options come last, so they override."""
    return [
        command,
        *("--config", QUICK, "--logs_dir", str(logs), "--trainer.max_steps", str(steps)),
        *("--trainer.log_every_n_steps", "1"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *extra,
    ]


def losses(run: Path) -> dict[int, float]:
    """The run's ``train/loss`` per step, from its TensorBoard events."""
    return scalars(run, "train/loss")


def scalars(run: Path, tag: str) -> dict[int, float]:
    """One scalar series of a run, read as ``report`` reads it."""
    from fff_lightning.report import read_curves

    return dict(read_curves(Path(run)).get(tag, []))


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))
