"""The bench's ``fit`` cases: the real CLI, timed by its ThroughputMonitor, plus two bench-only callbacks."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L

from fff_lightning import config_files


def fit_case(
    config: str, extra: list[str], model_dir: str, data_args: list[str], batch: int, ckpt: bool, opts, profile=None
) -> dict:
    """One real ``fit`` through the CLI (no validation, no logger, no checkpoint files), timed by its
    ThroughputMonitor."""
    from fff_lightning.callbacks.throughput import ThroughputMonitor
    from fff_lightning.lightning_cli import run_lightning

    callbacks = [
        {"class_path": "fff_lightning.callbacks.ThroughputMonitor", "init_args": {"warmup": opts.warmup}},
        {"class_path": "fff_lightning.bench.fit.Phases"},
    ]
    if profile:  # three profiled steps after the timed ones
        callbacks.append(
            {"class_path": "fff_lightning.bench.fit.ProfileSteps", "init_args": {"first": opts.steps, "out": profile}}
        )
    args = [
        "fit",
        "--config",
        str(config_files.path(config)),
        *opts.base_args,
        "--model.base.name_or_path",
        model_dir,
        "--model.base.gradient_checkpointing",
        str(ckpt).lower(),
        *data_args,
        "--data.batch_size",
        str(batch),
        "--data.num_proc",
        "null",
        "--trainer.max_steps",
        str(opts.steps + (3 if profile else 0)),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        "--logs_dir",
        opts.logs,
        "--model.base.max_memory_gib",  # checkpointing as asked, unless the case sets a cap (then the plan chooses)
        "null",
        *extra,
    ]
    import torch

    if torch.cuda.is_available():  # a cap is per process: an earlier case's must not limit this one
        torch.cuda.set_per_process_memory_fraction(1.0)
    cli = run_lightning(args)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor))
    phases = next(c for c in cli.trainer.callbacks if isinstance(c, Phases))
    from fff_lightning.adapters import count_parameters
    from fff_lightning.backends import packed_attention

    trainable = count_parameters(cli.model.model)["trainable"]
    plan = getattr(cli.model, "memory_plan", None)
    ran = loaded_words(cli.model.loaded_base, cli.model.plan.shape.num_hidden_layers)
    if plan is not None:
        ran = f"{ran} (memory plan)"
    data = cli.datamodule.plan()
    if data.packing and packed_attention.configured:
        ran = f"{ran}; packed rows: {packed_attention.configured[0]}"
    del cli
    timed = monitor.records[opts.warmup : opts.steps]
    if len(timed) < opts.steps - opts.warmup:
        print(
            f"[bench] warning: {len(timed)} timed steps, not {opts.steps - opts.warmup}: the data ran out", flush=True
        )
    return {
        "tokens_per_s": statistics.median(t / d for d, t, _ in timed),
        "mean_tokens_per_s": sum(t for _, t, _ in timed) / sum(d for d, _, _ in timed),
        "step_s": statistics.median(d for d, _, _ in timed),
        "peak_gib": monitor.summary["peak_mem_gib"],
        "trainable": trainable,
        "steps": len(timed),
        "extra": {
            **phases.report(),
            "ran": ran,
            "packed": bool(data.packing),
            "step_tokens": data.step_tokens,
            "plan": plan.describe() if plan is not None else None,
            "predicted_gib": round(plan.peak_gib, 3) if plan is not None else None,
        },
    }


def loaded_words(base, layers: int) -> str:
    """What a run's model was loaded with (its :attr:`~fff_lightning.module.FFFModule.loaded_base`), in words."""
    k = base.checkpoint_layers
    if not base.gradient_checkpointing:
        what = "checkpointing off"
    elif k is None or k >= layers:
        what = "checkpointing on"
    else:
        what = f"checkpointing on, first {k} of {layers} layers"
    return what + (", FFF recomputed" if base.recompute_fff else "")


class Phases(L.Callback):
    """Where a fit case's wall time goes (setup to training, first step, the rest) and its first losses, which
    must agree between variants of one run (same seed, same batches)."""

    def __init__(self):
        self.t = {"start": time.perf_counter()}
        self.losses = []

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        self.t["train_start"] = time.perf_counter()
        if torch.cuda.is_available():  # the weights and adapters, before any step
            self.resident_gib = torch.cuda.memory_allocated() / 2**30

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.t["first_step_done"] = time.perf_counter()
        if len(self.losses) < 4:
            self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self.t["end"] = time.perf_counter()

    def report(self) -> dict:
        t = self.t
        return {
            "setup_s": t.get("train_start", t["start"]) - t["start"],
            "first_step_s": t.get("first_step_done", t["start"]) - t.get("train_start", t["start"]),
            "first_losses": [round(float(x), 5) for x in self.losses],
            "resident_gib": round(getattr(self, "resident_gib", float("nan")), 3),
        }


class ProfileSteps(L.Callback):
    """Profile the training steps from ``first`` on with torch.profiler; at the end of training, write the table
    of operators and kernels by GPU time to ``out`` and print its top rows."""

    def __init__(self, first: int, out: str):
        self.first, self.out = first, out
        self.prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import torch

        if batch_idx == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        import torch

        if self.prof is None:
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=70)
        Path(self.out).write_text(table)
        print("\n".join(table.splitlines()[:30]))
