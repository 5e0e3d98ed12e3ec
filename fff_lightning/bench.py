"""``python -m fff_lightning bench``: tokens/s and peak memory of ``fit`` against bare training loops, in ONE process.

Cases (each on the same 4-bit model and the same batches):

* ``a``: a bare transformers + bitsandbytes nf4 + PEFT LoRA r16 loop (the usual QLoRA script);
* ``b``: a bare Unsloth LoRA r16 loop (the best peer);
* ``c``: ``fit``, LoRA r16 (``configs/step2_lora.yaml`` with ``--model.lora.preset lora``);
* ``d``: ``fit``, FFF only, step 2's FFF shape with its width matched to LoRA r16's budget (``budget --match``);
* ``e``: ``fit --config configs/step2.yaml`` (FFF 6x128 + LoRA r24);
* ``f``: ``fit --config configs/step2_lora.yaml`` (LoRA r46);
* ``e-mix-padded`` / ``e-mix-packed``: ``e`` on the bundled samples plus the long rows, padded or packed
  (``--data.packing true``), against ``e`` on full-length rows.

Every loop times a step from its start to the next step's start with CUDA events (no per-step sync), reports the
median tokens/s after ``--warmup`` steps, and the peak memory allocated while training (reset after loading).
Bare loops run with the settings of the research's configs: 8-bit AdamW, lr 5e-5, clip 1.0, bf16 autocast.
Case ``a`` runs first: Unsloth is imported before anything else (it must be) but patches transformers' model
classes only when it loads a model.

On a machine without CUDA it runs the tiny random Mistral for a few steps: a smoke test of every code path, whose
figures mean nothing (the table says so).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
FIT_CASES = {
    "c": ("fit, LoRA r16", "step2_lora.yaml", ["--model.lora.preset", "lora"]),
    "d": ("fit, FFF only at LoRA r16's budget", "step2.yaml", ["--model.lora", "null"]),
    "e": ("fit, configs/step2.yaml (FFF 6x128 + LoRA r24)", "step2.yaml", []),
    "f": ("fit, configs/step2_lora.yaml (LoRA r46)", "step2_lora.yaml", []),
}
BARE_CASES = {"a": "bare transformers + bnb + PEFT LoRA r16 loop", "b": "bare Unsloth LoRA r16 loop"}
MIX_CASES = {
    "e-mix-padded": "e on bundled samples + long rows, padded",
    "e-mix-packed": "e on bundled samples + long rows, packed",
}
#: Dense bf16 peak of known GPUs (vendors' datasheets, TFLOP/s), for model FLOPs utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class Result:
    case: str
    what: str
    batch: int
    checkpointing: bool
    tokens_per_s: float = float("nan")
    mean_tokens_per_s: float = float("nan")
    step_s: float = float("nan")
    peak_gib: float = float("nan")
    trainable: int = 0
    steps: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


# -- inputs ------------------------------------------------------------------------------------------------------
def long_rows(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """A prompt/response jsonl of ``n`` rows of about ``words`` words each (seeded), to fill a sequence."""
    rng = random.Random(seed)
    vocab = "the model adapter layer token train loss value data batch memory speed gated norm width rank".split()
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            row = {"prompt": f"Summarise note {i}: {text[: len(text) // 2]}", "response": text[len(text) // 2 :]}
            fh.write(json.dumps(row) + "\n")
    return path


def random_mistral_7b(folder: Path, quantized: bool = True) -> Path:
    """A random-weight Mistral-7B (the real shape) and the Mistral tokenizer in ``folder``; with ``quantized``,
    also its bitsandbytes nf4 copy in ``folder/nf4`` (loaded in seconds by every case). Built once; speed and
    memory do not depend on the weights' values (losses do: quote none)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig

    from fff_lightning.tokenizer import load_tokenizer

    bf16 = folder / "bf16"
    if not (bf16 / "config.json").exists():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(MistralConfig(), dtype=torch.bfloat16)
        model.save_pretrained(bf16)
        load_tokenizer(None).save_pretrained(bf16)
        del model
        torch.cuda.empty_cache()
    if not quantized:
        return bf16
    nf4 = folder / "nf4"
    if not (nf4 / "config.json").exists():
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            bf16, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0}
        )
        model.save_pretrained(nf4)
        load_tokenizer(None).save_pretrained(nf4)
        del model
        torch.cuda.empty_cache()
    return nf4


# -- the bare loops ----------------------------------------------------------------------------------------------
def _loader(tokenizer_dir: str, data: Path, batch: int, seq: int):
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.data.sources import SourceConfig

    dm = FFFDataModule(
        sources=[SourceConfig("long", str(data), "prompt_response", val_split=None)],
        batch_size=batch,
        max_seq_length=seq,
        tokenizer=tokenizer_dir,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def _cycle(loader):
    while True:
        yield from loader


def bare_loop(model, loader, steps: int, warmup: int, autocast: bool) -> dict:
    """Train ``model``'s trainable parameters for ``steps`` batches the way a hand-written script does."""
    import torch

    from fff_lightning.callbacks.throughput import _Clock

    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=5e-5, weight_decay=0.01)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    clock = _Clock(device)
    model.train()
    marks, tokens = [], []
    batches = _cycle(loader)
    for _ in range(steps):
        marks.append(clock.mark())
        batch = next(batches)
        tokens.append(batch["num_tokens"])
        ids, mask, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    marks.append(clock.mark())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    from fff_lightning.callbacks.throughput import peak_memory_gib

    times = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)][warmup:]
    toks = tokens[warmup:]
    del opt
    return {
        "tokens_per_s": statistics.median(t / d for t, d in zip(toks, times, strict=True)),
        "mean_tokens_per_s": sum(toks) / sum(times),
        "step_s": statistics.median(times),
        "peak_gib": peak_memory_gib(device),
        "trainable": sum(p.numel() for p in params),
        "steps": len(times),
    }


LORA16 = dict(r=16, lora_alpha=8, lora_dropout=0.0, bias="none")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_bare_hf(path: str, cuda: bool):
    """transformers + bitsandbytes nf4 (double quantisation) + PEFT LoRA r16 on all linear modules: QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, dtype=dtype, device_map={"": 0} if cuda else {"": "cpu"}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=ALL_LINEAR, **LORA16))
    model.config.use_cache = False
    return model


def set_bare_checkpointing(model, on: bool, unsloth: bool) -> None:
    if unsloth:  # Unsloth armed every decoder layer in get_peft_model; turn them on or off
        from transformers.modeling_layers import GradientCheckpointingLayer

        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):
                m.gradient_checkpointing = on
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def load_bare_unsloth(path: str, seq: int):
    """Unsloth's 4-bit load and its LoRA r16 on all linear modules, with its own checkpointing armed."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(
        model, target_modules=ALL_LINEAR, use_gradient_checkpointing="unsloth", random_state=3407, **LORA16
    )


# -- the fit cases -----------------------------------------------------------------------------------------------
def fit_case(
    config: str, extra: list[str], model_dir: str, data_args: list[str], batch: int, ckpt: bool, opts, profile=None
) -> dict:
    """One real ``fit`` through the CLI (no validation, no logger, no checkpoint files), timed by its
    ThroughputMonitor."""
    from fff_lightning.callbacks.throughput import ThroughputMonitor
    from fff_lightning.cli import run_lightning

    callbacks = [
        {"class_path": "fff_lightning.callbacks.ThroughputMonitor", "init_args": {"warmup": opts.warmup}},
        {"class_path": "fff_lightning.bench.Phases"},
    ]
    if profile:  # three profiled steps after the timed ones
        callbacks.append(
            {"class_path": "fff_lightning.bench.ProfileSteps", "init_args": {"first": opts.steps, "out": profile}}
        )
    args = [
        "fit",
        "--config",
        str(CONFIGS / config),
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
        *extra,
    ]
    cli = run_lightning(args)
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ThroughputMonitor))
    phases = next(c for c in cli.trainer.callbacks if isinstance(c, Phases))
    from fff_lightning.adapters import count_parameters

    trainable = count_parameters(cli.model.model)["trainable"]
    del cli
    timed = monitor.records[opts.warmup : opts.steps]
    return {
        "tokens_per_s": statistics.median(t / d for d, t, _ in timed),
        "mean_tokens_per_s": sum(t for _, t, _ in timed) / sum(d for d, _, _ in timed),
        "step_s": statistics.median(d for d, _, _ in timed),
        "peak_gib": monitor.summary["peak_mem_gib"],
        "trainable": trainable,
        "steps": len(timed),
        "extra": phases.report(),
    }


class Phases(L.Callback):
    """Where a fit case's wall time goes (setup to training, first step, the rest) and its first losses, which
    must agree between variants of one run (same seed, same batches)."""

    def __init__(self):
        self.t = {"start": time.perf_counter()}
        self.losses = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.t["train_start"] = time.perf_counter()

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


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(results: list[Result], r: Result, fn, *args) -> None:
    """``fn(*args)`` measures one case into ``r``."""
    t = time.perf_counter()
    try:
        for k, v in fn(*args).items():
            if k == "extra":
                r.extra.update(v)
            else:
                setattr(r, k, v)
    except Exception as e:  # a case that fails (out of memory...) is recorded; the others still run
        r.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        traceback.print_exc()
    finally:
        _free()
    r.extra["wall_s"] = time.perf_counter() - t
    results.append(r)
    if _JSON_OUT:  # after every case, so a run cut short still leaves what it measured
        Path(_JSON_OUT[0]).write_text(json.dumps([x.__dict__ for x in results], indent=2, default=str))
    shown = "FAILED " + r.error if r.error else f"{r.tokens_per_s:,.0f} tokens/s, peak {r.peak_gib:.2f} GiB"
    print(f"[bench] {r.case} batch {r.batch} checkpointing {'on' if r.checkpointing else 'off'}: {shown}", flush=True)


_JSON_OUT: list[str] = []


# -- report ------------------------------------------------------------------------------------------------------
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
    groups = sorted({(r.batch, r.checkpointing) for r in results}, key=lambda g: (-g[0], not g[1]))
    for batch, ckpt in groups:
        rows = [r for r in results if r.batch == batch and r.checkpointing == ckpt]
        base = next((r for r in rows if r.case == "b" and not r.error), None)
        lines += [
            f"## batch {batch} x {seq}, gradient checkpointing {'on' if ckpt else 'off'}",
            "",
            "| case | what | trainable | tokens/s (median) | vs b | step s | peak GiB | MFU |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r.error:
                lines.append(f"| {r.case} | {r.what} | | failed: {r.error} | | | | |")
                continue
            vs = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base else "-"
            mfu = (
                f"{model_flops_per_token(shape, seq, r.trainable) * r.tokens_per_s / (peak * 1e12):.1%}"
                if peak
                else "-"
            )
            lines.append(
                f"| {r.case} | {r.what} | {r.trainable:,} | {r.tokens_per_s:,.0f} | {vs} | {r.step_s:.3f} "
                f"| {r.peak_gib:.2f} | {mfu} |"
            )
        lines.append("")
    lines += targets(results)
    return "\n".join(lines) + "\n"


def targets(results: list[Result]) -> list[str]:
    """The issue's targets, each a ratio of two cases of the same group in this run."""

    def get(case, batch, ckpt):
        return next(
            (r for r in results if (r.case, r.batch, r.checkpointing) == (case, batch, ckpt) and not r.error), None
        )

    out = ["## Targets", "", "| target | batch | checkpointing | measured | met |", "|---|---|---|---|---|"]
    for batch, ckpt in sorted({(r.batch, r.checkpointing) for r in results}, key=lambda g: (-g[0], not g[1])):
        b, c, d, e, f = (get(k, batch, ckpt) for k in "bcdef")
        on = "on" if ckpt else "off"
        checks = []
        if b and c:
            checks.append(
                (
                    "c >= 0.95 x b tokens/s",
                    f"{c.tokens_per_s / b.tokens_per_s:.3f}x",
                    c.tokens_per_s >= 0.95 * b.tokens_per_s,
                )
            )
            checks.append(
                ("c peak <= b peak + 0.5 GiB", f"{c.peak_gib - b.peak_gib:+.2f} GiB", c.peak_gib <= b.peak_gib + 0.5)
            )
        if b and d:
            checks.append(
                ("d >= 1.0 x b tokens/s", f"{d.tokens_per_s / b.tokens_per_s:.3f}x", d.tokens_per_s >= b.tokens_per_s)
            )
        if e and f:
            checks.append(
                (
                    "e >= 0.95 x f tokens/s",
                    f"{e.tokens_per_s / f.tokens_per_s:.3f}x",
                    e.tokens_per_s >= 0.95 * f.tokens_per_s,
                )
            )
        if e and batch == 3:
            checks.append(("e peak <= 8 GiB", f"{e.peak_gib:.2f} GiB", e.peak_gib <= 8))
        packed, full = get("e-mix-packed", batch, ckpt), e
        if packed and full:
            ratio = packed.tokens_per_s / full.tokens_per_s
            checks.append(("packed mix >= 0.9 x e on full rows", f"{ratio:.3f}x", ratio >= 0.9))
        out += [f"| {name} | {batch} | {on} | {value} | {'yes' if ok else 'NO'} |" for name, value, ok in checks]
    return [*out, ""]


# -- main --------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="a local model folder (4-bit loads quantise it); default: see --random-7b")
    p.add_argument(
        "--random-7b",
        default=None,
        help="folder for a random-weight Mistral-7B (built once, then reused): the GPU default is a temp folder",
    )
    p.add_argument("--cases", default="a,b,c,d,e,f,e-mix-padded,e-mix-packed", help="comma-separated cases")
    p.add_argument("--batch", default="3,2", help="micro-batch sizes (samples of --seq tokens)")
    p.add_argument(
        "--checkpointing",
        default="on,off",
        help="gradient checkpointing: on, off or both (--extra and the e-mix cases run with the first one only)",
    )
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 64 on a CPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per case (default 14; 4 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default 4; 1 on a CPU)")
    p.add_argument("--data", help="a prompt/response jsonl of long rows (default: synthetic rows filling --seq)")
    p.add_argument("--out", help="write the Markdown report here (e.g. docs/benchmarks.md)")
    p.add_argument("--json", help="write the raw results here (after every case)")
    p.add_argument("--profile", default="", help="fit cases to profile (3 steps after the timed ones), e.g. e")
    p.add_argument("--profile-dir", default=".", help="where the profile tables go (prof-<case>-b<batch>.txt)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=CASE:ARGS",
        help="another fit case: CASE's config and overrides plus ARGS, e.g. 'e-comp=e:--model.base.compile_fff true'",
    )
    return p


def main(argv: list[str]) -> None:
    opts = parser().parse_args(argv)
    import torch

    from fff_lightning.loading import preimport_unsloth

    opts.cuda = torch.cuda.is_available()
    unsloth = preimport_unsloth() if opts.cuda else False
    seq = opts.seq or (2048 if opts.cuda else 64)
    opts.steps = opts.steps or (14 if opts.cuda else 4)
    opts.warmup = opts.warmup if opts.warmup is not None else (4 if opts.cuda else 1)
    if opts.steps <= opts.warmup:
        sys.exit("error: --steps must exceed --warmup")
    work = Path(tempfile.mkdtemp(prefix="fff-bench-"))
    opts.logs = str(work / "logs")
    cases = [c.strip() for c in opts.cases.split(",") if c.strip()]
    extras = {}
    for spec in opts.extra:
        name, _, rest = spec.partition("=")
        case, _, args = rest.partition(":")
        if case not in FIT_CASES or not name:
            sys.exit(f"error: --extra {spec!r}: use NAME=CASE:ARGS with CASE one of {', '.join(FIT_CASES)}")
        extras[name] = (case, args.split())
        if name not in cases:
            cases.append(name)
    unknown = [c for c in cases if c not in {**FIT_CASES, **BARE_CASES, **MIX_CASES, **extras}]
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; known: {', '.join([*BARE_CASES, *FIT_CASES, *MIX_CASES])}")
    batches = [int(b) for b in opts.batch.split(",")]
    if opts.json:
        _JSON_OUT[:] = [opts.json]
    profiled = {c.strip() for c in opts.profile.split(",") if c.strip()}
    ckpts = [{"on": True, "off": False}[c.strip()] for c in opts.checkpointing.split(",")]

    if opts.cuda:
        model_dir = Path(opts.model) if opts.model else random_mistral_7b(Path(opts.random_7b or work / "mistral7b"))
        opts.model_desc = str(opts.model) if opts.model else "random-weight Mistral-7B-v0.1 shape, nf4 (bitsandbytes)"
        opts.base_args = ["--model.base.backend", "auto"]
    else:
        from fff_lightning.loading import BaseModelConfig, tiny_model_dir

        model_dir = tiny_model_dir(BaseModelConfig(backend="tiny"))
        opts.model_desc = "tiny random Mistral (CPU smoke test)"
        opts.base_args = [
            "--model.base.backend", "tiny", "--model.base.load_in_4bit", "false", "--model.base.dtype", "float32",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.optimizer", "adamw",
        ]  # fmt: skip
    opts.base_args += ["--model.base.max_seq_length", str(seq)]
    data = Path(opts.data) if opts.data else long_rows(work / "long.jsonl", n=120, words=int(seq * 0.9))
    opts.data_desc = (
        f"{data}" if opts.data else f"120 synthetic prompt/response rows of about {seq} tokens (truncated to {seq})"
    )
    long_source = [
        "--data.sources="
        + json.dumps([{"name": "long", "path": str(data), "schema": "prompt_response", "val_split": None}])
    ]
    from fff_lightning.loading import model_shape
    from fff_lightning.run_config import load_model_spec

    shape = model_shape(load_model_spec(CONFIGS / "step2.yaml").base) if opts.cuda else None
    if not opts.cuda:
        from fff_lightning.loading import BaseModelConfig

        shape = model_shape(BaseModelConfig(backend="tiny"))
    d_args = _fff_only_width_args(opts.cuda)
    results: list[Result] = []
    print(f"[bench] {len(cases)} cases x batch {batches} x checkpointing {ckpts}, {opts.steps} steps each", flush=True)

    # Bare loops first, one model load each, reused over batch sizes and checkpointing.
    if "a" in cases:
        model = load_bare_hf(str(model_dir), opts.cuda)
        for batch in batches:
            loader = _loader(str(model_dir), data, batch, seq)
            for ckpt in ckpts:
                set_bare_checkpointing(model, ckpt, unsloth=False)
                r = Result("a", BARE_CASES["a"], batch, ckpt)
                _run(results, r, bare_loop, model, loader, opts.steps, opts.warmup, opts.cuda)
        del model
        _free()
    if "b" in cases:
        if not unsloth:
            print("[bench] b skipped: Unsloth needs CUDA and the `gpu` extra", flush=True)
        else:
            model = load_bare_unsloth(str(model_dir), seq)
            for batch in batches:
                loader = _loader(str(model_dir), data, batch, seq)
                for ckpt in ckpts:
                    set_bare_checkpointing(model, ckpt, unsloth=True)
                    r = Result("b", BARE_CASES["b"], batch, ckpt)
                    _run(results, r, bare_loop, model, loader, opts.steps, opts.warmup, True)
            del model
            _free()
    cpu_fff = [] if opts.cuda else ["--model.fff.layers", "1-2"]
    for batch in batches:
        for ckpt in ckpts:
            for case in cases:
                if ckpt != ckpts[0] and (case in MIX_CASES or case in extras):
                    continue  # variants run with the first checkpointing setting only
                if case in FIT_CASES or case in extras:
                    base_case, more = extras.get(case, (case, []))
                    what, config, args = FIT_CASES[base_case]
                    args = [
                        *args,
                        *(d_args if base_case == "d" else []),
                        *(cpu_fff if config == "step2.yaml" else []),
                        *more,
                    ]
                    what = what if case not in extras else f"{what} + {' '.join(more)}"
                    r = Result(case, what, batch, ckpt)
                    prof = (
                        f"{opts.profile_dir}/prof-{case}-b{batch}-{'gc' if ckpt else 'nogc'}.txt"
                        if case in profiled
                        else None
                    )
                    _run(results, r, fit_case, config, args, str(model_dir), long_source, batch, ckpt, opts, prof)
                elif case in MIX_CASES:
                    mix = _mix_args(data, batch, seq, packed=case.endswith("packed"))
                    r = Result(case, MIX_CASES[case], batch, ckpt)
                    _run(results, r, fit_case, "step2.yaml", [*cpu_fff, *mix], str(model_dir), [], batch, ckpt, opts)

    env = environment()
    command = "python -m fff_lightning bench " + " ".join(argv)
    text = report(results, opts, env, shape, seq, command)
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)
        print(f"report written to {opts.out}")


def _fff_only_width_args(cuda: bool) -> list[str]:
    """Case d: step 2's FFF shape (6 sub-layers on up_proj of layers 13-19; 1-2 on the tiny model) with the width
    whose budget is closest to LoRA r16's on all seven modules of every layer."""
    from dataclasses import replace

    from fff_lightning.budget import count_budget, match_fff_width
    from fff_lightning.loading import BaseModelConfig, model_shape
    from fff_lightning.lora import LoRAConfig
    from fff_lightning.run_config import load_model_spec

    spec = load_model_spec(CONFIGS / "step2.yaml")
    base = spec.base if cuda else BaseModelConfig(backend="tiny")
    fff = spec.fff if cuda else replace(spec.fff, layers="1-2")
    shape = model_shape(base)
    target = count_budget(shape, None, LoRAConfig(preset="lora")).trainable
    match = match_fff_width(shape, target, fff, None)
    return ["--model.fff.width", str(match.value)]


def _mix_args(data: Path, batch: int, seq: int, packed: bool) -> list[str]:
    """The bundled samples of the four datasets plus the long rows (the GPU smoke overlay's mix)."""
    src = [
        {"name": "magicoder", "path": "bundled:magicoder", "schema": "magicoder", "val_split": None},
        {"name": "metamath", "path": "bundled:metamath", "schema": "metamath", "val_split": None},
        {"name": "ultrachat", "path": "bundled:ultrachat", "schema": "ultrachat", "val_split": None},
        {"name": "artificial_thinker", "path": "bundled:artificial_thinker", "schema": "artificial_thinker",
         "repeat": 6, "val_split": None},
        {"name": "long", "path": str(data), "schema": "prompt_response", "val_split": None},
    ]  # fmt: skip
    args = [f"--data.sources={json.dumps(src)}"]
    if packed:
        args += ["--data.packing", "true", "--data.tokens_per_batch", str(batch * seq)]
    return args
