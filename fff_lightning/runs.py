"""Where a run's files go: its name, its folder under ``<logs_dir>/<experiment>/``, and the predictions file.

A trained run's folder holds its TensorBoard events, checkpoints, exported adapters and validation table;
``validate``/``test``/``predict`` write into the folder of the run they evaluate (found from the adapter folder
or checkpoint), else into ``<run>-<command>``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.spec import AdapterSpec


def run_name(adapters: AdapterSpec | None, adapter_path: str | None = None) -> str:
    """The default run name: the adapters' legend, or, when evaluating saved adapters, their run folder's name."""
    if adapter_path:
        return Path(adapter_path).resolve().parent.name or "adapter"
    return adapters.legend()


#: Run folders this process created; a run that fails before using its folder gives it back (release_unused).
CLAIMED: list[Path] = []


def claim(parent: Path, name: str) -> str:
    """Create ``parent/name`` (or ``name-1``, ``name-2``... if taken) in one step and return the name taken, so two
    runs started together never share a folder."""
    _writable(parent)
    candidate, i = name, 0
    while True:
        try:
            (parent / candidate).mkdir()
            CLAIMED.append(parent / candidate)
            return candidate
        except FileExistsError:
            i += 1
            candidate = f"{name}-{i}"


def claim_named(parent: Path, name: str, resuming: str | None) -> str:
    """The folder of a run named by ``--run_name``: a new one, or, when resuming (``--ckpt_path``), the existing one."""
    _writable(parent)
    try:
        (parent / name).mkdir()
        CLAIMED.append(parent / name)
    except FileExistsError:
        if not resuming:
            raise ConfigError(
                "run_name",
                f"{parent / name} exists (another run, or one running now): choose another --run_name, leave it out "
                "for a fresh name, or resume that run with --ckpt_path",
            ) from None
    return name


def _writable(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            "logs_dir", f"cannot write to {parent} ({e.strerror}): choose a --logs_dir you can write to"
        ) from None


def release_unused() -> None:
    """Remove the run folders this process claimed and never used (no checkpoint, adapter or table in them): a run
    that failed on its input leaves nothing behind that would shift the next run's name."""
    for folder in CLAIMED:
        if folder.is_dir() and not any((folder / n).exists() for n in ("checkpoints", "adapter", "validation.json")):
            shutil.rmtree(folder, ignore_errors=True)
    CLAIMED.clear()


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint, memory-mapped (cheap even for a large one), or one clear error if it is missing,
    truncated or not a checkpoint."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError("ckpt_path", f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError(
            "ckpt_path",
            f"{path} is truncated or not a checkpoint ({str(e).splitlines()[0][:120]}); pick an earlier one",
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError("ckpt_path", f"{path} is not a Lightning checkpoint")
    return checkpoint


def output_dir(command: str, logs_dir: str, experiment: str, run: str, adapter_path=None, ckpt_path=None) -> Path:
    """Where tables and predictions go: the trained run's folder when it is known."""
    if command == "fit":
        return Path(logs_dir) / experiment / run
    if adapter_path:
        return Path(adapter_path).resolve().parent
    if ckpt_path:
        return Path(ckpt_path).resolve().parent.parent
    return Path(logs_dir) / experiment / f"{run}-{command}"


def write_predictions(folder: Path, predictions: list[dict]) -> Path:
    """``predictions.jsonl`` in ``folder`` (``predictions-1.jsonl``... if taken: an earlier file is never
    overwritten): one ``{"prompt", "answer"}`` object per line."""
    from fff_lightning.files import write_text

    folder.mkdir(parents=True, exist_ok=True)
    out, i = folder / "predictions.jsonl", 0
    while out.exists():
        i += 1
        out = folder / f"predictions-{i}.jsonl"
    return write_text(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
