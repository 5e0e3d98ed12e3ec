"""Tokens/s, samples/s and peak memory: logged while training, summarised at the end."""

from __future__ import annotations

import resource
import statistics
import time

import lightning as L
import torch


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ThroughputMonitor(L.Callback):
    """Measure every training batch; the summary reports medians after ``warmup`` batches (compilation, caches).

    Tokens are the non-padding tokens of a batch (its attention mask). Logged as ``perf/tokens_per_s``,
    ``perf/samples_per_s`` and ``perf/peak_mem_gib``; ``summary`` holds the end-of-fit figures.

    Args:
        warmup: batches left out of the summary's medians.
        log_every_n_steps: how often to log.
    """

    def __init__(self, warmup: int = 3, log_every_n_steps: int = 10):
        self.warmup = warmup
        self.every = log_every_n_steps
        self.records: list[tuple[float, int, int]] = []
        self.summary: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t
        tokens = int(batch["attention_mask"].sum()) * trainer.world_size
        samples = batch["input_ids"].shape[0] * trainer.world_size
        self.records.append((dt, tokens, samples))
        if trainer.global_step % self.every == 0:
            pl_module.log_dict(
                {
                    "perf/tokens_per_s": tokens / dt,
                    "perf/samples_per_s": samples / dt,
                    "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
                }
            )

    def on_train_end(self, trainer, pl_module) -> None:
        timed = self.records[self.warmup :] or self.records
        if not timed:
            return
        self.summary = {
            "batches": len(self.records),
            "median_tokens_per_s": statistics.median(t / d for d, t, _ in timed),
            "median_samples_per_s": statistics.median(s / d for d, _, s in timed),
            "median_batch_s": statistics.median(d for d, _, _ in timed),
            "peak_mem_gib": peak_memory_gib(pl_module.device),
            "memory": "GPU allocated" if pl_module.device.type == "cuda" else "CPU process RSS",
        }
        if trainer.is_global_zero:
            s = self.summary
            print(
                f"throughput: median {s['median_tokens_per_s']:,.0f} tokens/s, "
                f"{s['median_samples_per_s']:.2f} samples/s "
                f"over {len(timed)} batches (first {min(self.warmup, len(self.records))} left out); "
                f"peak memory {s['peak_mem_gib']:.2f} GiB ({s['memory']})"
            )
