"""Tokens/s of ``fit`` on 2 GPUs (DDP) against 1 at the same per-GPU batch, for the step-2 configs.

Run on one host with two GPUs: ``python tests/gpu/ddp_scaling.py --model DIR --out ddp.md``. ``DIR`` is a local
(4-bit) model folder; without ``--model`` a random-weight Mistral-7B is built once under ``--random-7b`` (no hub
is needed; speed does not depend on the weights, losses do: quote none from it). The data are long synthetic
prompt/response rows truncated to 2048 tokens (no padding to speak of), so tokens/s compare directly.

Each run is the real CLI in its own process, ``python -m fff_lightning fit --config configs/<cfg> --trainer.devices
N ...`` (Lightning's own launcher starts the second process), with no validation or logger (the configs checkpoint every 500 steps). The
figure is the run's own ``throughput:`` line (median over the steps after the first 3; with 2 processes it counts
both processes' tokens). The ratio is 2-GPU tokens/s over 1-GPU tokens/s, both measured in this one call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"throughput: median ([\d,]+) tokens/s.*?peak memory ([\d.]+) GiB")


def build(folder: Path, rows: int) -> tuple[Path, Path]:
    """The random 7B (nf4) and the long rows, built in a process without Unsloth (faster to start)."""
    code = (
        "import sys; from pathlib import Path; from fff_lightning.bench.loops import random_mistral_7b, long_rows;"
        f"m = random_mistral_7b(Path({str(folder)!r}));"
        f"d = long_rows(Path({str(folder)!r}) / 'long.jsonl', n={rows}, words=int(2048 * 0.9)); print(m)"
    )
    env = {**os.environ, "FFF_NO_UNSLOTH": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1]), folder / "long.jsonl"


def fit(config: str, devices: int, model: Path, data: Path, steps: int, logs: Path, timeout: int) -> dict:
    src = [{"name": "long", "path": str(data), "schema": "prompt_response", "val_split": None}]
    cmd = [
        sys.executable, "-m", "fff_lightning", "fit", "--config", f"configs/{config}",
        "--model.base.name_or_path", str(model),
        f"--data.sources={json.dumps(src)}", "--data.num_proc", "null",
        "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--logs_dir", str(logs), "--experiment", f"ddp-{config.removesuffix('.yaml')}-{devices}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    m = LINE.search(text)
    return {
        "config": config,
        "devices": devices,
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "tokens_per_s": float(m.group(1).replace(",", "")) if m else None,
        "peak_gib_rank0": float(m.group(2)) if m else None,
        "command": "python -m fff_lightning fit " + " ".join(cmd[4:]),
        "tail": text[-6000:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local model folder; default: a random-weight Mistral-7B in --random-7b")
    p.add_argument("--random-7b", default="/tmp/m7b")
    p.add_argument("--configs", default="step2.yaml,step2_lora.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--out", default="ddp_scaling.md")
    p.add_argument("--json", default="ddp_scaling.json")
    opts = p.parse_args()

    import torch

    n_gpu = torch.cuda.device_count()
    if n_gpu < 2:
        sys.exit(f"error: this needs 2 GPUs on one host; {n_gpu} visible")
    t0 = time.perf_counter()
    model, data = (Path(opts.model), None) if opts.model else build(Path(opts.random_7b), rows=600)
    if data is None:
        data = Path(opts.random_7b) / "long.jsonl"
        from fff_lightning.bench.loops import long_rows

        long_rows(data, n=600, words=int(2048 * 0.9))
    print(f"[ddp] model {model} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    logs = Path(opts.random_7b) / "logs"
    results = []
    for config in opts.configs.split(","):
        for devices in (1, 2):
            r = fit(config, devices, model, data, opts.steps, logs, opts.timeout)
            results.append(r)
            print(
                f"[ddp] {config} x{devices}: rc {r['rc']}, {r['tokens_per_s']} tokens/s, "
                f"peak {r['peak_gib_rank0']} GiB, {r['wall_s']} s",
                flush=True,
            )
            if r["tokens_per_s"] is None:
                print(r["tail"][-3000:], flush=True)
            Path(opts.json).write_text(json.dumps(results, indent=1))

    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"GPUs: {n_gpu} x {gpu}; torch {torch.__version__}; per-GPU batch 3 x 2048 (the configs'); {opts.steps} steps, "
        "median after the first 3; model: " + (str(opts.model) if opts.model else "random-weight Mistral-7B, nf4"),
        "",
        "| config | tokens/s, 1 GPU | tokens/s, 2 GPUs | 2 GPUs / 1 | peak GiB per GPU (1 / 2) |",
        "|---|---|---|---|---|",
    ]
    for config in opts.configs.split(","):
        one, two = (next(r for r in results if r["config"] == config and r["devices"] == d) for d in (1, 2))
        ratio = (
            f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one["tokens_per_s"] and two["tokens_per_s"] else "-"
        )
        fmt = lambda v: f"{v:,.0f}" if v else "failed"  # noqa: E731
        lines.append(
            f"| {config} | {fmt(one['tokens_per_s'])} | {fmt(two['tokens_per_s'])} | {ratio} | "
            f"{one['peak_gib_rank0']} / {two['peak_gib_rank0']} |"
        )
    lines += ["", "Commands (1 GPU; the 2-GPU runs differ only in `--trainer.devices 2`):", ""]
    lines += [f"    {r['command']}" for r in results if r["devices"] == 1]
    text = "\n".join(lines)
    Path(opts.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
