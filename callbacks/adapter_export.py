"""Export the trained adapters in the foundation format (safetensors + JSON) beside the run's logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class AdapterExport(L.Callback):
    """Write ``<log dir>/adapter/`` at the end of fit (and every ``every_n_steps`` steps, if set).

    Lightning's own checkpoints of this project also hold only trainable tensors (plus optimizer and loop
    state, for resuming); this export is the small file to share or load with ``validate --model.adapter_path``.
    It asks the module to write the files (``export_adapters``), so it needs nothing else of it.

    Args:
        dirpath: where to write; default ``<log dir>/adapter``.
        every_n_steps: also export every N optimizer steps (to ``adapter-step<N>``); 0 for the end only.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0):
        self.dirpath = dirpath
        self.every = every_n_steps
        self.last: Path | None = None

    def _folder(self, trainer: L.Trainer, pl_module: L.LightningModule, suffix: str = "") -> Path:
        root = Path(self.dirpath) if self.dirpath else run_folder(trainer, pl_module) / "adapter"
        return root.with_name(root.name + suffix)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        if trainer.is_global_zero:
            self.last = pl_module.export_adapters(folder, global_step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step and trainer.global_step % self.every == 0:
            self._export(trainer, pl_module, self._folder(trainer, pl_module, f"-step{trainer.global_step}"))

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, self._folder(trainer, pl_module))
        if trainer.is_global_zero:
            print(f"adapters saved to {self.last}")


def run_folder(trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
    """The run's folder: the one its plan names (the CLI's run folder), else the Trainer's log directory."""
    run_dir = getattr(getattr(pl_module, "plan", None), "run_dir", None)
    return Path(run_dir or trainer.log_dir or trainer.default_root_dir)
