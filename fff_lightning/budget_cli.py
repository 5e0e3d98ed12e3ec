"""``python -m fff_lightning budget``: trainable parameters of a run, and the matching other side."""

from __future__ import annotations

import argparse
import json

from fff_lightning import backends, kinds
from fff_lightning.errors import ConfigError

#: The names --match took before adapter kinds were plug-ins.
MATCH_ALIASES = {"lora_rank": "lora", "fff_width": "fff"}
DESCRIPTION = """\
Print the trainable parameters of a run (per adapter, total, share of the base model) for the run's real
model shape, without loading or downloading weights. With --match KIND, solve the other side of a fair comparison:
  --match lora      the LoRA-only rank whose budget is closest to this run's (or to --target); also lora_rank
  --match dora      the DoRA-only rank, likewise
  --match par_bn    the parallel bottleneck adapter alone: its bottleneck width, likewise
  --match fff       the FFF width (this run's FFF shape and other adapters) closest to --target; also fff_width
With --memory, print the memory plan `fit` would choose on a card of that many GB (usable: 0.5 GiB less) for the
largest step the data config allows (batch_size x max_seq_length, or tokens_per_batch when packing), e.g.
  --memory 8        one card        --memory 6,8,12,16,24,141   a table
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning budget",
        allow_abbrev=False,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", "-c", action="append", required=True, help="a run config, as `fit` takes it (repeat to stack)"
    )
    p.add_argument(
        "--match",
        choices=[*kinds.names(), *MATCH_ALIASES],
        help="an adapter kind: solve its size for the other side of a comparison",
    )
    p.add_argument(
        "--target",
        help="budget to match: a number of parameters or another run config, whose adapters are counted on this "
        "run's base model (default for a kind matched alone: this run's budget)",
    )
    p.add_argument(
        "--memory",
        metavar="GB[,GB...]",
        help="card sizes in GB: print the memory plan for each (nothing loads; the unsloth backend's calibration)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.epilog = "Any other option overrides the configs as it does for `fit`, e.g. --model.lora.r 8."
    return p


def _target(value: str | None, default: int | None, shape, match: str = "fff") -> int:
    from fff_lightning.budget import config_budget

    if value is None:
        if default is None:
            raise ConfigError("--target", f"--match {match} needs a target: a number or another run config")
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


def _cards(value: str) -> list[float]:
    try:
        cards = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        cards = []
    if not cards or any(not 0.5 < c < 10_000 for c in cards):
        raise ConfigError("--memory", f"card sizes in GB above 0.5, comma-separated (e.g. 8 or 6,8,24); got {value!r}")
    return cards


def memory_plans(described, cards: list[float]) -> list[dict]:
    """The memory plan of a described run on cards of ``cards`` GB (usable: 0.5 GiB less each), for the largest
    step its data config allows. Raises ConfigError (one line) when none fits and only one card was asked for."""
    from fff_lightning import memory
    from fff_lightning.backends import memory_plan as mp

    run, dm = described.model, described.datamodule
    backend = run.base.backend
    if mp.calibration(backend, dry_run=True) is None:
        raise ConfigError("--memory", f"the memory plan is calibrated for the unsloth backend; this run uses {backend}")
    unplanned = [k.name for k in run.adapters.kinds() if not k.planned_in_memory]
    if unplanned:
        raise ConfigError("--memory", f"the memory plan does not model the {unplanned[0]} adapter (calibrated for FFF "
                          "and LoRA); a cap still caps the allocator, with checkpointing as configured")  # fmt: skip
    shape = run.plan.shape
    tokens = dm.plan().worst_step_tokens  # before any data is read
    trainable = run.plan.budget.trainable
    rows = []
    for card in cards:
        cap = card - memory.MARGIN_GIB
        row = {"card_gb": card, "cap_gib": cap, "tokens": tokens}
        try:
            chosen = memory.plan(run.base, run.adapters, shape, trainable, run.optim["name"], tokens, cap, backend,
                                 dry_run=True)  # fmt: skip
            row.update(fits=True, plan=chosen.describe(), predicted_gib=round(chosen.peak_gib, 2),
                       relative_time=round(chosen.time, 3))  # fmt: skip
        except ConfigError:
            if len(cards) == 1:
                raise
            layout = mp.layout_of(shape, run.adapters, trainable, run.optim["name"], run.base.load_in_4bit)
            smallest = min(mp.plans(layout, tokens, mp.calibration(backend, dry_run=True)), key=lambda p: p.peak_gib)
            row.update(fits=False, plan=None, needs_gib=round(smallest.needs_gib(), 2))
        rows.append(row)
    return rows


def main(argv: list[str]) -> None:
    args, overrides = parser().parse_known_args(argv)
    from fff_lightning.budget import match_kind
    from fff_lightning.run_config import describe_run

    described = describe_run(*args.config, overrides=overrides)
    if args.memory is not None:
        _print_memory(args, memory_plans(described, _cards(args.memory)))
        return
    plan = described.model.plan  # the run resolved and checked once, as fit resolves it
    spec, base, shape, budget = plan.adapters, plan.base, plan.shape, plan.budget
    result: dict = {
        "config": args.config if len(args.config) > 1 else args.config[0],
        "model": backends.get(base.backend).model_name(base),
        **budget.counts,
        "trainable": budget.trainable,
        "base": budget.base,
        "share": budget.share,
    }
    match = None
    if args.match is not None:
        name = MATCH_ALIASES.get(args.match, args.match)
        kind = kinds.get(name)
        if not kind.match_alone and spec.configs.get(name) is None:
            raise ConfigError(f"model.{name}", f"--match {args.match} needs a run with a {name} section")
        default = budget.trainable if kind.match_alone else None
        match = match_kind(shape, _target(args.target, default, shape, args.match), spec, name)
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
        *((kinds.get(name).title, fmt(n)) for name, n in budget.counts.items()),
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


def _print_memory(args, rows: list[dict]) -> None:
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    steps = f"steps of up to {rows[0]['tokens']:,} tokens"
    if len(rows) == 1:
        r = rows[0]
        print(f"memory plan on a card of {r['card_gb']:g} GB ({r['cap_gib']:g} GiB usable), {steps}: {r['plan']}, "
              f"predicted peak {r['predicted_gib']:.2f} GiB")  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{' + '.join(args.config)}: memory plans, {steps}")
    for col in ("card", "usable GiB", "plan", "predicted peak GiB", "time vs no checkpointing"):
        table.add_column(col, justify="left" if col == "plan" else "right")
    for r in rows:
        if r["fits"]:
            table.add_row(f"{r['card_gb']:g} GB", f"{r['cap_gib']:g}", r["plan"], f"{r['predicted_gib']:.2f}",
                          f"{r['relative_time']:.2f}x")  # fmt: skip
        else:
            table.add_row(f"{r['card_gb']:g} GB", f"{r['cap_gib']:g}", f"nothing fits (needs {r['needs_gib']:.2f} "
                          "GiB usable)", "-", "-")  # fmt: skip
    import sys

    Console(width=None if sys.stdout.isatty() else 140).print(table)
