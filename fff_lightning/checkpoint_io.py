"""Lightning checkpoints: written atomically, read without ever running code, checked before they are used.

Writing: a kill or a full disk during a save leaves the earlier checkpoints whole, never a truncated file.

Reading: a checkpoint is a pickle, and unpickling an arbitrary one runs whatever code it names. Every read here
(the check before a run starts and Lightning's own restore) goes through ``torch.load(weights_only=True)``, which
unpickles tensors, containers and plain values only; a file that needs more (a pickled object, a NumPy array) is
refused in one line. Then every entry a resume reads is checked for its type, and every tensor for its dtype and
finiteness, before anything is trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fff_lightning.errors import ConfigError
from fff_lightning.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO`, but the file is written beside its name and renamed into place, and it is always
    read with ``weights_only=True`` (whatever ``--weights_only`` says), so restoring one can never run code."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_file(Path(path), "wb") as fh:
            torch.save(checkpoint, fh)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint of this project, memory-mapped (cheap even for a large one) and checked
    (:func:`check_checkpoint`); one clear :class:`ConfigError` if it is missing, truncated, not a checkpoint, needs
    code to be unpickled, or holds entries of the wrong type or tensors that are not finite."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("ckpt_path", f"no such checkpoint: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as e:
        raise ConfigError("ckpt_path", f"cannot read {path} ({e.strerror})") from None
    if not head.startswith(b"PK\x03\x04"):  # every checkpoint torch.save writes is a zip archive
        raise ConfigError(
            "ckpt_path",
            f"{path} is not a checkpoint ({_first_bytes(head)}; a checkpoint is the archive torch.save writes, "
            "such as <run>/checkpoints/last.ckpt)",
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            what = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "global" in ln), "")
            raise ConfigError(
                "ckpt_path",
                f"{path} holds objects that only code could rebuild ({what[:140]}), not only tensors and plain "
                "values: refused, nothing of it was run. Checkpoints written by fff_lightning never need that; use "
                "one of them",
            ) from None
        raise ConfigError(
            "ckpt_path",
            f"{path} is truncated or not a checkpoint ({text.splitlines()[0][:120] if text else type(e).__name__}); "
            "pick an earlier one",
        ) from None
    check_checkpoint(checkpoint, path)
    return checkpoint


def _first_bytes(head: bytes) -> str:
    """What a file that is not a checkpoint begins with, short: empty, text, or bytes."""
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the 64 bytes is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    text = text.splitlines()[0] if text.strip() else ""
    if text.isprintable() and text.strip():
        return f"it is text: {text[:40]!r}"
    return f"it begins with the bytes {head[:8].hex(' ')}"


def _bad(path, what: str) -> ConfigError:
    return ConfigError("ckpt_path", f"{path} is damaged or not written by fff_lightning: {what}")


def _tensors(value, where: str):
    """Every tensor inside nested dicts, lists and tuples, with where it sits."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")


def check_checkpoint(checkpoint, path) -> None:
    """Refuse a checkpoint whose entries a resume would trip over: every entry Lightning and this project read has
    its type checked; the adapter tensors must be floating point; every floating-point tensor must be finite."""
    if not isinstance(checkpoint, dict):
        raise _bad(path, f"it holds a {type(checkpoint).__name__}, not a checkpoint's mapping")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise _bad(path, f"'state_dict' is {type(state).__name__}, not a mapping of tensors")
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise _bad(path, f"state_dict entry {name!r} is {type(tensor).__name__}, not a tensor")
        if not tensor.dtype.is_floating_point:
            raise _bad(path, f"adapter tensor {name} is {tensor.dtype}, not floating point")
    types = {
        "epoch": int,
        "global_step": int,
        "loops": dict,
        "callbacks": dict,
        "optimizer_states": list,
        "lr_schedulers": list,
        "hyper_parameters": dict,
        "fff_adapters": dict,
    }
    for key, kind in types.items():
        value = checkpoint.get(key, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _bad(path, f"'{key}' is {type(value).__name__}, not {kind.__name__}")
    for key in ("optimizer_states", "lr_schedulers"):
        for i, entry in enumerate(checkpoint.get(key, [])):
            if not isinstance(entry, dict):
                raise _bad(path, f"{key}[{i}] is {type(entry).__name__}, not a mapping")
    for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
        if not isinstance(opt.get("state", {}), dict) or not isinstance(opt.get("param_groups", []), list):
            raise _bad(path, f"optimizer_states[{i}] lacks its 'state' mapping or 'param_groups' list")
    for key, value in checkpoint.items():  # the data module's state, under its class name
        if key.endswith("DataModule") and not isinstance(value, dict):
            raise _bad(path, f"'{key}' is {type(value).__name__}, not a mapping")
    if isinstance(checkpoint.get("global_step"), int) and checkpoint["global_step"] < 0:
        raise _bad(path, f"global_step {checkpoint['global_step']} is negative")
    for where, tensor in _tensors({k: checkpoint.get(k) for k in ("state_dict", "optimizer_states")}, "checkpoint"):
        if tensor.dtype.is_floating_point and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise ConfigError(
                "ckpt_path",
                f"{path} holds NaN or infinite values ({where.removeprefix('checkpoint.')}): the run had diverged "
                "when it was saved; resume from an earlier checkpoint",
            )


def finish_epoch_end_state(checkpoint: dict) -> None:
    """Make a checkpoint saved at the end of an epoch resume into the next epoch.

    ``ModelCheckpoint`` saves in ``on_train_epoch_end``, after Lightning counted the epoch as processed but before
    it counted it as completed. Resuming such a checkpoint, Lightning 2.6 re-runs the end of that epoch and counts
    it a second time, with its batch counters still at the epoch's end: a run resumed with a larger
    ``max_epochs`` trained nothing (``max_epochs=N reached`` at once). Here the epoch is recorded as completed and
    the per-epoch counters are started afresh, as Lightning does when an epoch begins, so the next epoch trains.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict):
        return
    epochs = fit.get("epoch_progress", {})
    batches = fit.get("epoch_loop.batch_progress", {})
    try:
        cur = epochs["current"]
        at_end = cur["processed"] == cur["started"] == cur["ready"] and cur["completed"] == cur["processed"] - 1
        at_end = at_end and batches.get("is_last_batch") is True
        done = batches["current"]["completed"] == batches["current"]["processed"]
    except (KeyError, TypeError):
        return
    if not (at_end and done):
        return
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]

    def zero_current(progress):
        if isinstance(progress, dict):
            for k, v in progress.items():
                if k == "current" and isinstance(v, dict):
                    progress[k] = dict.fromkeys(v, 0)
                else:
                    zero_current(v)

    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress",
                "epoch_loop.automatic_optimization.optim_progress"):  # fmt: skip
        zero_current(fit.get(key))
    batches["is_last_batch"] = False
    val = fit.get("epoch_loop.val_loop.batch_progress")
    if isinstance(val, dict) and isinstance(val.get("total"), dict):
        val["total"] = dict.fromkeys(val["total"], 0)
