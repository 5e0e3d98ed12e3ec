"""Where a run's files go: its name, its folder under ``<logs_dir>/<experiment>/``, and the predictions file.

A trained run's folder holds its TensorBoard events, checkpoints, exported adapters and validation table;
``validate``/``test``/``predict`` write into the folder of the run they evaluate (found from the adapter folder
or checkpoint), else into ``<run>-<command>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fff_lightning.spec import AdapterSpec


def run_name(adapters: AdapterSpec | None, adapter_path: str | None = None) -> str:
    """The default run name: the adapters' legend, or, when evaluating saved adapters, their run folder's name."""
    if adapter_path:
        return Path(adapter_path).resolve().parent.name or "adapter"
    return adapters.legend()


def claim(parent: Path, name: str) -> str:
    """Create ``parent/name`` (or ``name-1``, ``name-2``... if taken) in one step and return the name taken, so two
    runs started together never share a folder."""
    parent.mkdir(parents=True, exist_ok=True)
    candidate, i = name, 0
    while True:
        try:
            (parent / candidate).mkdir()
            return candidate
        except FileExistsError:
            i += 1
            candidate = f"{name}-{i}"


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
    """``predictions.jsonl`` in ``folder``: one ``{"prompt", "answer"}`` object per line."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "predictions.jsonl"
    out.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    return out
