"""What several test files read from a run: its logged losses, its adapter weights; and the environment for runs
started as subprocesses (which import ``faults`` from this folder)."""

import os
from pathlib import Path

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # `faults` for the subprocesses
QUICK = str(Path(__file__).parent.parent / "configs" / "quickstart.yaml")


def quick_args(logs, *extra, steps: int, command: str = "fit") -> list[str]:
    """The command line of a short quickstart run into ``logs``: logging every step, no progress bar or model
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted(Path(run).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({s.step: s.value for s in acc.Scalars("train/loss")})
    return out


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))
