"""Tokens/s, samples/s and peak memory: logged while training, summarised at the end, with no per-step sync."""

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


class _Clock:
    """Marks points in time: CUDA events on a GPU (recorded on the stream, read later, so timing never makes the
    CPU wait for the GPU), ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ready(self, mark) -> bool:
        return not self.cuda or mark.query()

    def seconds(self, start, end) -> float:
        return end - start if not self.cuda else start.elapsed_time(end) / 1000


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch: the collators count them on the CPU as ``num_tokens``."""
    n = batch.get("num_tokens")
    if isinstance(n, int):
        return n
    mask = batch.get("attention_mask")  # another data module's batch: count from the mask (reads the GPU)
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class ThroughputMonitor(L.Callback):
    """Measure every training batch; the summary reports medians after ``warmup`` batches (compilation, caches).

    A batch's time runs from its start to the next batch's start, so data loading, the optimizer step and every
    gap between steps are counted (a batch followed by validation or a checkpoint is timed to its own end
    instead). Tokens are real tokens (no padding). Logged as ``perf/tokens_per_s``, ``perf/samples_per_s`` and
    ``perf/peak_mem_gib`` (a few steps late on a GPU: times are read once the GPU has got there); ``summary``
    holds the end-of-fit figures. With several processes the summary counts every process's tokens (added up once,
    at the end); the per-step log counts the first process's share times the number of processes, and peak memory
    is the first process's.

    Args:
        warmup: batches left out of the summary's medians.
        log_every_n_steps: how often to log.
    """

    def __init__(self, warmup: int = 3, log_every_n_steps: int = 10):
        self.warmup = warmup
        self.every = log_every_n_steps
        self.records: list[tuple[float, int, int]] = []  # (seconds, tokens, samples) per batch
        self.summary: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock = _Clock(pl_module.device)
        self._open: list[dict] = []  # batches whose time is not read yet
        self._last_logged = 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        start = self.clock.mark()
        if self._open and "next" not in self._open[-1]:
            self._open[-1]["next"] = start  # the previous batch ran until this one started
        self._open.append(
            {
                "start": start,
                "tokens": batch_tokens(batch),  # this process's; the summary adds up every process's
                "samples": batch.get("num_samples", batch["input_ids"].shape[0]),
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._open[-1]["end"] = self.clock.mark()
        self._collect()
        if trainer.global_step % self.every == 0 and len(self.records) > self._last_logged:
            self._last_logged = len(self.records)
            dt, tokens, samples = self.records[-1]
            world = trainer.world_size  # logged per step without a sync: this process's share times the processes
            pl_module.log_dict(
                {
                    "perf/tokens_per_s": tokens * world / dt,
                    "perf/samples_per_s": samples * world / dt,
                    "perf/peak_mem_gib": peak_memory_gib(pl_module.device),
                }
            )

    def _interrupt(self) -> None:
        """Validation or a checkpoint follows: time the last batch to its own end."""
        if self._open and "end" in self._open[-1]:
            self._open[-1].setdefault("next", self._open[-1]["end"])

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.training and hasattr(self, "_open"):
            self._interrupt()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if hasattr(self, "_open"):
            self._interrupt()

    def _collect(self, final: bool = False) -> None:
        """Move batches whose start and stop the GPU has reached into ``records`` (all of them when ``final``)."""
        while self._open:
            rec = self._open[0]
            stop = rec.get("next") or (rec.get("end") if final else None)
            if stop is None or not (final or self.clock.ready(stop)):
                return
            self.records.append((self.clock.seconds(rec["start"], stop), rec["tokens"], rec["samples"]))
            self._open.pop(0)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._collect(final=True)
        if trainer.world_size > 1 and self.records:  # every process's tokens and samples, batch by batch
            counts = torch.tensor([[t, n] for _, t, n in self.records], dtype=torch.float64, device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum").cpu().tolist()
            self.records = [(d, int(t), int(n)) for (d, _, _), (t, n) in zip(self.records, counts, strict=True)]
        timed = self.records[self.warmup :] or self.records
        if not timed:
            return
        self.summary = {
            "batches": len(self.records),
            "timed_batches": len(timed),
            "median_tokens_per_s": statistics.median(t / d for d, t, _ in timed),
            "mean_tokens_per_s": sum(t for _, t, _ in timed) / sum(d for d, _, _ in timed),
            "median_samples_per_s": statistics.median(s / d for d, _, s in timed),
            "median_batch_s": statistics.median(d for d, _, _ in timed),
            "peak_mem_gib": peak_memory_gib(pl_module.device),
            "memory": "GPU allocated" if pl_module.device.type == "cuda" else "CPU process RSS",
            "processes": trainer.world_size,
        }
        if trainer.is_global_zero:
            s = self.summary
            left_out = (
                f"first {self.warmup} left out" if len(self.records) > self.warmup else "too few to leave any out"
            )
            print(
                f"throughput: median {s['median_tokens_per_s']:,.0f} tokens/s, "
                f"{s['median_samples_per_s']:.2f} samples/s over {len(timed)} batches ({left_out}); "
                f"peak memory {s['peak_mem_gib']:.2f} GiB ({s['memory']}"
                + (f", process 0 of {trainer.world_size}; tokens/s of all of them)" if trainer.world_size > 1 else ")")
            )
        plan = getattr(pl_module, "memory_plan", None)
        if plan is not None:
            measured = self.summary["peak_mem_gib"]
            self.summary.update(memory_plan=plan.describe(), predicted_peak_gib=plan.peak_gib)
            if trainer.is_global_zero:
                print(f"memory plan: {plan.describe()}; predicted peak {plan.peak_gib:.2f} GiB, measured "
                      f"{measured:.2f} GiB ({measured / plan.peak_gib - 1:+.1%})")  # fmt: skip
