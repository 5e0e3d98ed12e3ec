"""``python -m fff_lightning budget``: trainable parameters of a run, and the matching other side."""

from __future__ import annotations

import argparse
import json

from fff_lightning import backends
from fff_lightning.errors import ConfigError

DESCRIPTION = """\
Print the trainable parameters of a run (per adapter, total, share of the base model) for the run's real
model shape, without loading or downloading weights. With --match, solve the other side of a fair comparison:
  --match lora_rank   the LoRA-only rank whose budget is closest to this run's (or to --target)
  --match fff_width   the FFF width (this run's FFF shape and LoRA) whose budget is closest to --target
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning budget",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", "-c", action="append", required=True, help="a run config, as `fit` takes it (repeat to stack)"
    )
    p.add_argument("--match", choices=["lora_rank", "fff_width"], help="solve the other side of a comparison")
    p.add_argument(
        "--target",
        help="budget to match: a number of parameters or another run config, whose adapters are counted on this "
        "run's base model (default for lora_rank: this run's budget)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.epilog = "Any other option overrides the configs as it does for `fit`, e.g. --model.lora.r 8."
    return p


def _target(value: str | None, default: int | None, shape) -> int:
    from fff_lightning.budget import config_budget

    if value is None:
        if default is None:
            raise ConfigError("--target", "--match fff_width needs a target: a number or another run config")
        return default
    if value.replace("_", "").replace(",", "").isdigit():
        return int(value.replace("_", "").replace(",", ""))
    return config_budget(value, shape, "--target")  # the other run's adapters on this run's base model


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{title}[/bold]")
    table = Table()
    table.add_column("")
    table.add_column("parameters", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


def main(argv: list[str]) -> None:
    args, overrides = parser().parse_known_args(argv)
    from fff_lightning.budget import match_fff_width, match_lora_rank
    from fff_lightning.run_config import describe_run

    run = describe_run(*args.config, overrides=overrides).model
    spec, base, shape = run.adapters, run.base, run.base_shape()
    from fff_lightning.adapters import count_adapters

    budget = count_adapters(spec, shape)
    result: dict = {
        "config": args.config if len(args.config) > 1 else args.config[0],
        "model": backends.get(base.backend).model_name(base),
        "fff": budget.fff,
        "lora": budget.lora,
        "trainable": budget.trainable,
        "base": budget.base,
        "share": budget.share,
    }
    match = None
    if args.match == "lora_rank":
        match = match_lora_rank(shape, _target(args.target, budget.trainable, shape), spec.lora)
    elif args.match == "fff_width":
        if spec.fff is None:
            raise ConfigError("model.fff", "--match fff_width needs a run with an fff section")
        match = match_fff_width(shape, _target(args.target, None, shape), spec.fff, spec.lora)
    if match is not None:
        result["match"] = {
            "field": match.field,
            "value": match.value,
            "trainable": match.budget.trainable,
            "target": match.target,
            "difference": match.difference,
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    fmt = "{:,}".format
    rows = [
        ("FFF", fmt(budget.fff)),
        ("LoRA", fmt(budget.lora)),
        ("trainable", fmt(budget.trainable)),
        ("base model", fmt(budget.base)),
        ("share of base", f"{budget.share:.3%}"),
    ]
    title = " + ".join(args.config)
    _table(f"{title}: {result['model']} ({shape.num_hidden_layers} layers, d={shape.hidden_size})", rows)
    if match is not None:
        m = match
        _table(
            f"--match {args.match}: {m.field} = {m.value}",
            [
                ("target", fmt(m.target)),
                (f"{m.field}={m.value}", fmt(m.budget.trainable)),
                ("difference", f"{m.difference:+,} ({m.difference / m.target:+.3%})"),
            ],
        )
