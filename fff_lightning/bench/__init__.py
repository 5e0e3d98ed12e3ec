"""``python -m fff_lightning bench``: tokens/s and peak memory of ``fit`` against bare training loops, in ONE process.

Cases (each on the same 4-bit model and the same batches):

* ``a``: a bare transformers + bitsandbytes nf4 + PEFT LoRA r16 loop (the usual QLoRA script);
* ``b``: a bare Unsloth LoRA r16 loop (the best peer);
* ``c``: ``fit``, LoRA r16 (``configs/step2_lora.yaml`` with ``--model.lora.preset lora``);
* ``d``: ``fit``, FFF only, step 2's FFF shape with its width matched to LoRA r16's budget (``budget --match``);
* ``e``: ``fit --config configs/step2.yaml`` (FFF 6x128 + LoRA r24);
* ``f``: ``fit --config configs/step2_lora.yaml`` (LoRA r46);
* ``e-auto``: ``e`` as shipped, ``max_memory_gib: auto``: the memory plan chooses checkpointing for the GPU's
  free memory (its rows form a group of their own, with the plan that ran and its predicted peak);
* ``e-mix-padded`` / ``e-mix-packed``: ``e`` on the bundled samples plus the long rows, padded or packed
  (``--data.packing true``), against ``e`` on full-length rows.

Every ``fit`` case runs what its row says: checkpointing as ``--checkpointing`` asks, with no memory plan
(``--model.base.max_memory_gib null``), unless the case sets ``max_memory_gib`` (``e-auto``, or an ``--extra``
such as ``'e8=e-mix-packed:--model.base.max_memory_gib 7.5'``); then the plan chooses, and the row says what it
chose. The column "ran" says what the model was loaded with, read from the run itself.

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
import gc
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fff_lightning import config_files

FIT_CASES = {
    "c": ("fit, LoRA r16", "step2_lora.yaml", ["--model.lora.preset", "lora"]),
    "d": ("fit, FFF only at LoRA r16's budget", "step2.yaml", ["--model.lora", "null"]),
    "e": ("fit, configs/step2.yaml (FFF 6x128 + LoRA r24)", "step2.yaml", []),
    "f": ("fit, configs/step2_lora.yaml (LoRA r46)", "step2_lora.yaml", []),
    "e-auto": ("fit, configs/step2.yaml, the memory plan for the free memory", "step2.yaml",
               ["--model.base.max_memory_gib", "auto"]),
}  # fmt: skip
BARE_CASES = {"a": "bare transformers + bnb + PEFT LoRA r16 loop", "b": "bare Unsloth LoRA r16 loop"}
MIX_CASES = {
    "e-mix-padded": "e on bundled samples + long rows, padded",
    "e-mix-packed": "e on bundled samples + long rows, packed",
}


@dataclass
class Result:
    case: str
    what: str
    batch: int
    checkpointing: bool | None  # None: the memory plan chose (the row's "ran" says what)
    tokens_per_s: float = float("nan")
    mean_tokens_per_s: float = float("nan")
    step_s: float = float("nan")
    peak_gib: float = float("nan")
    trainable: int = 0
    steps: int = 0
    error: str | None = None
    extra: dict = field(default_factory=dict)


# -- inputs ------------------------------------------------------------------------------------------------------
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
    for write in _REPORT_OUT:  # the Markdown report too
        write(results)
    shown = "FAILED " + r.error if r.error else f"{r.tokens_per_s:,.0f} tokens/s, peak {r.peak_gib:.2f} GiB"
    ran = r.extra.get("ran") or checkpointing_words(r.checkpointing)
    print(f"[bench] {r.case} batch {r.batch}, {ran}: {shown}", flush=True)


def checkpointing_words(ckpt: bool | None) -> str:
    return {True: "checkpointing on", False: "checkpointing off", None: "checkpointing as the memory plan chose"}[ckpt]


def planned(args: list[str]) -> bool:
    """Whether a fit case's arguments set a memory cap (then the memory plan chooses its checkpointing)."""
    return any(a.startswith("--model.base.max_memory_gib") for a in args)


_JSON_OUT: list[str] = []
_REPORT_OUT: list = []  # writes the Markdown report of the results so far


# -- report ------------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--model", help="a local model folder (4-bit loads quantise it); default: see --random-7b")
    p.add_argument(
        "--random-7b",
        default=None,
        help="folder for a random-weight Mistral-7B (built once, then reused): the GPU default is a temp folder",
    )
    p.add_argument("--cases", default="a,b,c,d,e,f,e-auto,e-mix-padded,e-mix-packed", help="comma-separated cases")
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

    from fff_lightning.backends import preimport_unsloth
    from fff_lightning.bench.fit import fit_case
    from fff_lightning.bench.loops import (
        bare_loop,
        bench_loader,
        load_bare_hf,
        load_bare_unsloth,
        long_rows,
        random_mistral_7b,
        set_bare_checkpointing,
    )
    from fff_lightning.bench.report import environment, report

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
        if case not in {**FIT_CASES, **MIX_CASES} or not name or name in {**FIT_CASES, **MIX_CASES, **BARE_CASES}:
            sys.exit(
                f"error: --extra {spec!r}: use NAME=CASE:ARGS with a new NAME and CASE one of "
                f"{', '.join([*FIT_CASES, *MIX_CASES])}"
            )
        extras[name] = (case, args.split())
        if name not in cases:
            cases.append(name)
    unknown = [c for c in cases if c not in {**FIT_CASES, **BARE_CASES, **MIX_CASES, **extras}]
    if unknown:
        sys.exit(f"error: unknown case(s) {unknown}; known: {', '.join([*BARE_CASES, *FIT_CASES, *MIX_CASES])}")
    if opts.json:
        _JSON_OUT[:] = [opts.json]
    profiled = {c.strip() for c in opts.profile.split(",") if c.strip()}
    ckpts = [{"on": True, "off": False}[c.strip()] for c in opts.checkpointing.split(",")]

    if opts.cuda:
        model_dir = Path(opts.model) if opts.model else random_mistral_7b(Path(opts.random_7b or work / "mistral7b"))
        opts.model_desc = str(opts.model) if opts.model else "random-weight Mistral-7B-v0.1 shape, nf4 (bitsandbytes)"
        opts.base_args = ["--model.base.backend", "auto"]
    else:
        from fff_lightning.backends.tiny import tiny_model_dir
        from fff_lightning.spec import BaseModelConfig

        model_dir = tiny_model_dir(BaseModelConfig(backend="tiny"))
        opts.model_desc = "tiny random Mistral (CPU smoke test)"
        opts.base_args = [
            "--model.base.backend", "tiny", "--model.base.load_in_4bit", "false", "--model.base.dtype", "float32",
            "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.optimizer", "adamw",
        ]  # fmt: skip
    opts.base_args += ["--model.base.max_seq_length", str(seq)]
    batches = [int(b) for b in opts.batch.split(",")]
    # Enough rows for every timed step (a fit case runs one epoch at most: fewer rows would end it early).
    rows = max(120, max(batches) * (opts.steps + 3 + 3))
    data = Path(opts.data) if opts.data else long_rows(work / "long.jsonl", n=rows, words=int(seq * 0.9))
    opts.data_desc = (
        f"{data}" if opts.data else f"{rows} synthetic prompt/response rows of about {seq} tokens (truncated to {seq})"
    )
    long_source = [
        "--data.sources="
        + json.dumps([{"name": "long", "path": str(data), "schema": "prompt_response", "val_split": None}])
    ]
    from fff_lightning.spec import BaseModelConfig

    shape = (BaseModelConfig() if opts.cuda else BaseModelConfig(backend="tiny")).shape()
    d_args = _fff_only_width_args(opts.cuda)
    results: list[Result] = []
    env = environment()
    command = "python -m fff_lightning bench " + " ".join(argv)
    if opts.out:
        _REPORT_OUT[:] = [lambda done: Path(opts.out).write_text(report(done, opts, env, shape, seq, command))]
    print(f"[bench] {len(cases)} cases x batch {batches} x checkpointing {ckpts}, {opts.steps} steps each", flush=True)

    # Bare loops first, one model load each, reused over batch sizes and checkpointing.
    if "a" in cases:
        model = load_bare_hf(str(model_dir), opts.cuda)
        for batch in batches:
            loader = bench_loader(str(model_dir), data, batch, seq)
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
                loader = bench_loader(str(model_dir), data, batch, seq)
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
                if case in BARE_CASES:
                    continue
                base_case, more = extras.get(case, (case, []))
                if base_case in MIX_CASES:
                    what, config = MIX_CASES[base_case], "step2.yaml"
                    args = [*cpu_fff, *_mix_args(data, batch, seq, packed=base_case.endswith("packed"))]
                    sources = []
                else:
                    what, config, args = FIT_CASES[base_case]
                    args = [
                        *args,
                        *(d_args if base_case == "d" else []),
                        *(cpu_fff if config == "step2.yaml" else []),
                    ]
                    sources = long_source
                args = [*args, *more]
                what = what if case not in extras else f"{what} + {' '.join(more)}"
                row_ckpt = None if planned(args) else ckpt
                if ckpt != ckpts[0] and (row_ckpt is None or case in MIX_CASES or case in extras):
                    continue  # variants, and cases the memory plan decides, run once per batch size
                r = Result(case, what, batch, row_ckpt)
                prof = (
                    f"{opts.profile_dir}/prof-{case}-b{batch}-{'gc' if ckpt else 'nogc'}.txt"
                    if case in profiled
                    else None
                )
                _run(results, r, fit_case, config, args, str(model_dir), sources, batch, ckpt, opts, prof)

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
    from fff_lightning.run_config import describe_run
    from fff_lightning.spec import BaseModelConfig, LoRAConfig

    step2 = describe_run(config_files.path("step2")).model
    base = step2.base if cuda else BaseModelConfig(backend="tiny")
    fff = step2.adapters.fff if cuda else replace(step2.adapters.fff, layers="1-2")
    shape = base.shape()
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
