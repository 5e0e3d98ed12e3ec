"""Deterministic seeding: Python, NumPy, torch, CUDA, dataloader workers and cuBLAS."""

from __future__ import annotations

import os

import lightning as L
import torch


class DeterministicSeed(L.Callback):
    """Seed everything before the model is built (seed 12 by default, the research's).

    With ``Trainer(deterministic=True)`` it also sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (which deterministic
    cuBLAS needs) before the first GPU matmul; otherwise cuBLAS keeps its default, larger workspace, which is
    faster on Hopper GPUs. The data order itself is fixed by the data module's own seed, whatever the workers.

    Args:
        seed: the seed.
    """

    def __init__(self, seed: int = 12):
        self.seed = seed
        L.seed_everything(seed, workers=True, verbose=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if torch.are_deterministic_algorithms_enabled():  # Trainer(deterministic=True) turned them on
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # Again at setup: anything that drew random numbers since construction must not shift the model's init.
        L.seed_everything(self.seed, workers=True, verbose=False)
