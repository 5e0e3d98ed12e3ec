"""What several test files read from a run: its logged losses, its adapter weights; and the environment for runs
started as subprocesses (which import ``faults`` from this folder)."""

import os
from pathlib import Path

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # `faults` for the subprocesses


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
