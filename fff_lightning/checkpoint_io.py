"""Lightning checkpoints written atomically: a kill or a full disk during a save leaves the earlier checkpoints
whole, never a truncated file that cannot be resumed from."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fff_lightning.files import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO`, but the file is written beside its name and renamed into place."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        with atomic_file(Path(path), "wb") as fh:
            torch.save(checkpoint, fh)
