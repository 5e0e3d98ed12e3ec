"""The bench's report: the Markdown table per batch size and checkpointing setting, MFU, and the targets."""

from __future__ import annotations

import datetime
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fff_lightning.bench import Result

#: Dense bf16 peak of known GPUs (vendors' datasheets, TFLOP/s), for model FLOPs utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def model_flops_per_token(shape, seq: int, trainable: int) -> float:
    """Model FLOPs of one trained token with a frozen base: forward (2 per weight) and the backward to the
    activations (2 per weight) through every linear layer and the LM head, attention's two matmuls (causal: half
    the window on average) forward and backward, and 6 per adapter parameter. Recomputation is not counted."""
    d, i, n = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    kv = shape.num_key_value_heads * (d // shape.num_attention_heads)
    linear = n * (2 * d * d + 2 * d * kv + 3 * d * i) + d * shape.vocab_size
    attention = n * 2 * 2 * d * (seq / 2) * 3
    return 4 * linear + attention + 6 * trainable


def environment() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "lightning", "transformers", "peft", "bitsandbytes", "unsloth", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "-"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return {"gpu": gpu, "versions": versions}


def peak_tflops(gpu: str) -> float | None:
    for name, tf in BF16_PEAK_TFLOPS.items():
        if name in gpu:
            return tf
    return None


def report(results: list[Result], opts, env: dict, shape, seq: int, command: str) -> str:
    peak = peak_tflops(env["gpu"])
    smoke = not opts.cuda
    lines = [
        "# Benchmark: `fit` against bare training loops" + (" (CPU smoke test: figures mean nothing)" if smoke else ""),
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {env['gpu']}; bf16 dense peak for MFU: "
        + (f"{peak:.0f} TFLOP/s (datasheet)" if peak else "unknown"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- model: {opts.model_desc}",
        f"- data: {opts.data_desc}",
        f"- steps: {opts.steps} per case, the first {opts.warmup} left out; median of the rest",
        f"- command: `{command}`",
        "",
        "tokens/s counts real tokens (no padding); a step is timed from its start to the next step's start (CUDA "
        "events, no per-step sync); peak is `torch.cuda.max_memory_allocated` while training, reset after loading. "
        "MFU = model FLOPs per token (4 x linear weights + attention + 6 x adapter parameters; recomputation not "
        "counted) x tokens/s / bf16 peak.",
        "",
    ]
    for batch, ckpt in _groups(results):
        rows = [r for r in results if r.batch == batch and r.checkpointing == ckpt]
        base = next((r for r in rows if r.case == "b" and not r.error), None)
        planned = ckpt is None
        how = "as the memory plan chose" if planned else ("on" if ckpt else "off")
        lines += [
            f"## batch {batch} x {seq}, gradient checkpointing {how}",
            "",
            "| case | what | ran | trainable | tokens/s (median) | vs b | step s | peak GiB |"
            + (" predicted GiB |" if planned else "")
            + " MFU |",
            "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if planned else "") + "---:|",
        ]
        for r in rows:
            ran = r.extra.get("ran", "checkpointing " + how)
            if r.error:
                lines.append(f"| {r.case} | {r.what} | {ran} | | failed: {r.error} | | | |" + (" |" if planned else "")
                             + " |")  # fmt: skip
                continue
            vs = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
            mfu = (
                f"{model_flops_per_token(shape, seq, r.trainable) * r.tokens_per_s / (peak * 1e12):.1%}"
                if peak
                else "-"
            )
            predicted = r.extra.get("predicted_gib")
            plan_cell = (f" {predicted:.2f} |" if predicted else " - |") if planned else ""
            lines.append(
                f"| {r.case} | {r.what} | {ran} | {r.trainable:,} | {r.tokens_per_s:,.0f} | {vs} | {r.step_s:.3f} "
                f"| {r.peak_gib:.2f} |{plan_cell} {mfu} |"
            )
        lines.append("")
    lines += targets(results)
    return "\n".join(lines) + "\n"


def _groups(results: list[Result]) -> list[tuple[int, bool | None]]:
    """(batch, checkpointing) groups: larger batches first, then on, off, and the memory plan's rows."""
    order = {True: 0, False: 1, None: 2}
    return sorted({(r.batch, r.checkpointing) for r in results}, key=lambda g: (-g[0], order[g[1]]))


def targets(results: list[Result]) -> list[str]:
    """The issue's targets, each a ratio of two cases of the same group in this run."""

    def get(case, batch, ckpt):
        return next(
            (r for r in results if (r.case, r.batch, r.checkpointing) == (case, batch, ckpt) and not r.error), None
        )

    from fff_lightning.backends.memory_plan import FRAGMENTATION, HEADROOM_GIB, with_margin

    out = ["## Targets", "", "| target | batch | checkpointing | measured | met |", "|---|---|---|---|---|"]
    for batch, ckpt in _groups(results):
        on = {True: "on", False: "off", None: "memory plan"}[ckpt]
        checks = []
        if ckpt is not None:
            b, c, d, e, f = (get(k, batch, ckpt) for k in "bcdef")
            if b and c:
                checks.append(("c >= 0.95 x b tokens/s", f"{c.tokens_per_s / b.tokens_per_s:.3f}x",
                               c.tokens_per_s >= 0.95 * b.tokens_per_s))  # fmt: skip
                checks.append(("c peak <= b peak + 0.5 GiB", f"{c.peak_gib - b.peak_gib:+.2f} GiB",
                               c.peak_gib <= b.peak_gib + 0.5))  # fmt: skip
            if b and d:
                checks.append(("d >= 1.0 x b tokens/s", f"{d.tokens_per_s / b.tokens_per_s:.3f}x",
                               d.tokens_per_s >= b.tokens_per_s))  # fmt: skip
            if e and f:
                checks.append(("e >= 0.95 x f tokens/s", f"{e.tokens_per_s / f.tokens_per_s:.3f}x",
                               e.tokens_per_s >= 0.95 * f.tokens_per_s))  # fmt: skip
            if e and batch == 3:
                checks.append(("e peak <= 8 GiB", f"{e.peak_gib:.2f} GiB", e.peak_gib <= 8))
            packed, full = get("e-mix-packed", batch, ckpt), e
            if packed and full:
                ratio = packed.tokens_per_s / full.tokens_per_s
                checks.append(("packed mix >= 0.95 x e on full rows", f"{ratio:.3f}x", ratio >= 0.95))
        for r in results:  # every planned row: its peak within the plan's margin
            predicted = r.extra.get("predicted_gib")
            if (r.batch, r.checkpointing) != (batch, ckpt) or r.error or not predicted:
                continue
            allowed = with_margin(predicted)
            name = (f"{r.case}: peak within the plan's margin ({predicted:.2f} x {1 + FRAGMENTATION:.2f} + "
                    f"{HEADROOM_GIB:.2f} = {allowed:.2f} GiB)")  # fmt: skip
            measured = f"{r.peak_gib:.2f} GiB ({r.peak_gib / predicted - 1:+.1%})"
            checks.append((name, measured, r.peak_gib <= allowed))
        out += [f"| {name} | {batch} | {on} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    return [*out, ""]
