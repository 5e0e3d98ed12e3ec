"""Export the trained adapters in the foundation format (safetensors + JSON) beside the run's logs."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class AdapterExport(L.Callback):
    """Write ``<log dir>/adapter/`` at the end of fit (and every ``every_n_steps`` steps, if set).

    Lightning's own checkpoints of this project also hold only trainable tensors (plus optimizer and loop
    state, for resuming); this export is the small file to share or load with ``validate --model.adapter_path``.

    Args:
        dirpath: where to write; default ``<log dir>/adapter``.
        every_n_steps: also export every N optimizer steps (to ``adapter-step<N>``); 0 for the end only.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0):
        self.dirpath = dirpath
        self.every = every_n_steps
        self.last: Path | None = None

    def _folder(self, trainer: L.Trainer, suffix: str = "") -> Path:
        root = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
        return root.with_name(root.name + suffix)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path) -> None:
        from fff_lightning.adapters import save_adapters

        base = {
            "name_or_path": pl_module.base.name_or_path if pl_module.base.backend != "tiny" else "tiny",
            "hidden_size": pl_module.shape.hidden_size,
            "num_hidden_layers": pl_module.shape.num_hidden_layers,
            "global_step": trainer.global_step,
        }
        if trainer.is_global_zero:
            save_adapters(pl_module.model, folder, pl_module.fff, pl_module.lora, base)
            self.last = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step and trainer.global_step % self.every == 0:
            self._export(trainer, pl_module, self._folder(trainer, f"-step{trainer.global_step}"))

    def on_train_end(self, trainer, pl_module) -> None:
        self._export(trainer, pl_module, self._folder(trainer))
        if trainer.is_global_zero:
            print(f"adapters saved to {self.last}")
