"""``python -m fff_lightning report <run folders...> --out <folder>``: the research's comparison, for any runs.

Writes into ``--out``:

* ``validation.md`` / ``validation.csv``: the per-dataset validation loss of every run, one column per run (from
  each run's ``validation.json``), with the research's published figures beside them on ``--reference research``;
* ``train_loss.png`` and ``val_loss.png``: the training and validation loss over optimizer steps, one line per
  run, read from the runs' TensorBoard event files;
* ``final_val_loss.png``: the final validation loss per dataset, one bar per run (and per published figure).

A run keeps its colour in every figure.

With seeds (runs named ``...-seed=<n>``, as ``sweep`` names them) or ``--compare NAME=GLOB ...``, the runs are taken
together as arms (:mod:`fff_lightning.compare`): the figures then show each arm's mean over its seeds with a 95%
interval (bars) or a band (curves), and ``comparison.md`` / ``comparison.json`` give each arm's interval per dataset
and, for two arms, their paired difference on the same validation samples with a verdict (``difference.png``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.files import atomic_file, write_text

#: The study's published per-dataset validation losses (its step-2 table: LoRA r46, FFF 6x128 + LoRA r24), under
#: the dataset names fff_lightning uses.
RESEARCH = {
    "research LoRA (published)": {
        "magicoder": 0.457,
        "metamath": 0.471,
        "ultrachat": 1.023,
        "artificial_thinker": 0.194,
    },
    "research FFF (published)": {
        "magicoder": 0.460,
        "metamath": 0.476,
        "ultrachat": 1.049,
        "artificial_thinker": 0.143,
    },
}
REFERENCE_NOTE = (
    "The published figures are Hugging Face's eval_loss (a mean of per-batch means, batch 5, model in bf16) on the "
    "real datasets and weights; compare them with runs validated with `--model.val_reduction batches "
    "--data.val_batch_size 5`."
)


def read_run(folder: Path) -> dict:
    """A run's name, validation table and loss curves."""
    table = folder / "validation.json"
    if not table.is_file():
        raise ConfigError("report", f"{folder} has no validation.json: finish the run or run `validate` on it")
    try:
        rows = json.loads(table.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("report", f"{table} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:  # ValueError: an integer of > 4,300 digits
        raise ConfigError("report", f"{table} is not a validation table ({type(e).__name__})") from None
    from fff_lightning.table import read_samples

    run = {"name": folder.name, "rows": check_rows(table, rows), "curves": read_curves(folder)}
    entry = sweep_entries(folder.parent).get(folder.name, {})
    m = _SEED.search(folder.name)
    run["seed"] = entry.get("seed", int(m.group(1)) if m else _config_seed(folder))
    run["group"] = entry.get("group") or (folder.name[: m.start()] if m else folder.name)
    run["trainable"] = entry.get("trainable") or _trainable(folder / "adapter")
    run["samples"] = read_samples(folder)
    from fff_lightning.evaluate import read_task_results

    run["tasks"] = read_task_results(folder)
    return run


_SEED = re.compile(r"-seed=(\d+)$")  # what `sweep` appends to a seeded run's name


def sweep_entries(experiment: Path) -> dict[str, dict]:
    """The runs that ``sweep.json`` records in an experiment folder (state, seed, group, trainable), or nothing."""
    try:
        data = json.loads((experiment / "sweep.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _config_seed(folder: Path) -> int | None:
    """``model.seed`` of a run's saved ``config.yaml`` (a plain ``fit``), or ``None``."""
    import yaml

    try:
        if (folder / "config.yaml").stat().st_size > 1 << 20:
            return None
        seed = yaml.safe_load((folder / "config.yaml").read_text())["model"]["seed"]
    except (OSError, yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def _trainable(adapter: Path) -> int | None:
    """The trainable count of a run's exported adapters, from the safetensors header alone (8 bytes of length, then
    JSON), without torch; ``None`` where there is no readable file."""
    from fff_lightning.spec import WEIGHTS_NAME

    try:
        with open(adapter / WEIGHTS_NAME, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < 1 << 26 else {}
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__") or None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


def check_rows(table: Path, rows) -> list[dict]:
    """The rows of a ``validation.json`` as ``validate`` writes them (a list of objects with a ``dataset`` name and
    a numeric ``loss``); anything else is refused in one line naming the file."""
    if not isinstance(rows, list) or not rows:
        what = "an empty list" if rows == [] else f"a JSON {type(rows).__name__}"
        raise ConfigError("report", f"{table} is not a validation table: it holds {what}, not a list of rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("dataset"), str):
            raise ConfigError("report", f"{table}: row {i + 1} is not an object with a 'dataset' name")
        loss = r.get("loss")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ConfigError("report", f"{table}: row {i + 1} ({r['dataset']}) has no numeric 'loss' ({loss!r})")
        for key, value in r.items():  # every figure a table holds fits a float (the arithmetic is in floats)
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise ConfigError("report", f"{table}: row {i + 1} ({r['dataset']}) has {key!r} = {str(value)[:20]}"
                                  f"... ({len(str(abs(value)))} digits): not a figure a validation writes")  # fmt: skip
    return rows


def truncated_at(event_file: Path) -> int | None:
    """The byte at which an event file's last record is cut off (a run killed mid-write, a copy cut short), or
    ``None`` when every record is whole. TensorBoard's reader stops there without a word."""
    import struct

    size, pos = event_file.stat().st_size, 0
    with open(event_file, "rb") as fh:
        while pos < size:
            head = fh.read(12)  # uint64 length, uint32 masked crc of the length
            if len(head) < 12:
                return pos
            (n,) = struct.unpack("<Q", head[:8])
            end = pos + 12 + n + 4  # the data and its crc
            if end > size:
                return pos
            fh.seek(end)
            pos = end
    return None


def read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the scalar series in a run's TensorBoard event files; a file cut short is
    read up to its last whole record, with a warning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for f in sorted(folder.glob("events.out.tfevents.*")):
        cut = truncated_at(f)
        if cut is not None:
            print(f"warning: {f} is cut short at byte {cut:,} of {f.stat().st_size:,}: its curves stop at the last "
                  "whole record", file=sys.stderr)  # fmt: skip
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            curves.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def table_rows(runs: list[dict], reference: bool) -> tuple[list[str], list[str], list[list]]:
    """``(columns, datasets, values)``: one row per dataset, one column per run (and published figure)."""
    datasets: list[str] = []
    for run in runs:
        for r in run["rows"]:
            if r["dataset"] not in datasets:
                datasets.append(r["dataset"])
    columns = [run["name"] for run in runs] + (list(RESEARCH) if reference else [])
    values = []
    for ds in datasets:
        row = [next((r["loss"] for r in run["rows"] if r["dataset"] == ds), None) for run in runs]
        row += [RESEARCH[k].get(ds) for k in RESEARCH] if reference else []
        values.append(row)
    return columns, datasets, values


def write_tables(out: Path, runs: list[dict], reference: bool) -> list[Path]:
    columns, datasets, values = table_rows(runs, reference)
    seen = {r["dataset"] for run in runs for r in run["rows"] if r.get("seen_in_training")}
    reductions = sorted({r.get("reduction", "tokens") for run in runs for r in run["rows"]})

    def cell(v):
        if v is None:
            return ""  # the run has no such dataset
        return f"{v:.4f}" if math.isfinite(v) else f"{v} (NOT FINITE)"

    md = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for ds, row in zip(datasets, values, strict=True):
        md.append(f"| {ds}{' (seen in training)' if ds in seen else ''} | " + " | ".join(cell(v) for v in row) + " |")
    md += ["", f"Validation loss per dataset (reduction: {', '.join(reductions)}); lower is better."]
    if seen:
        md.append(
            "(seen in training): that dataset's validation rows are also training rows; its loss is not held-out."
        )
    if reference:
        md.append(REFERENCE_NOTE)
    write_text(out / "validation.md", "\n".join(md) + "\n")
    with atomic_file(out / "validation.csv") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", *columns])
        for ds, row in zip(datasets, values, strict=True):
            w.writerow([ds, *(cell(v) for v in row)])
    return [out / "validation.md", out / "validation.csv"]


def _colours(names: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def plot_curves(out: Path, runs: list[dict], colours: dict) -> list[Path]:
    import matplotlib.pyplot as plt

    from fff_lightning.compare import save_curve

    files = []
    for tag, title, fname in (
        ("train/loss", "Training loss", "train_loss.png"),
        ("val/loss", "Validation loss (all datasets, token-weighted)", "val_loss.png"),
    ):
        fig, ax = plt.subplots(figsize=(12, 5.5))
        drawn = 0
        for run in runs:
            points = run["curves"].get(tag, [])
            if points:
                steps, vals = zip(*points, strict=True)
                ax.plot(
                    steps,
                    vals,
                    label=run["name"],
                    color=colours[run["name"]],
                    marker="o" if len(points) < 20 else None,
                    markersize=3,
                )
                drawn += 1
        files.append(save_curve(fig, ax, title, tag, drawn, out / fname))
    return files


def plot_bars(out: Path, runs: list[dict], reference: bool, colours: dict) -> Path:
    import matplotlib.pyplot as plt

    from fff_lightning.compare import save_bars

    columns, datasets, values = table_rows(runs, reference)
    n = len(columns)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(10, 1.6 * len(datasets) + 0.3 * n + 4), 5.5))
    for j, name in enumerate(columns):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(datasets))]
        ys = [row[j] if row[j] is not None else 0 for row in values]
        if name in RESEARCH:  # published figures: hatched outlines, so they never pass for a run of ours
            style = {"color": "white", "edgecolor": "black", "hatch": "//" if "LoRA" in name else ".."}
        else:
            style = {"color": colours[name]}
        ax.bar(xs, ys, width, label=name, **style)
    return save_bars(fig, ax, datasets, "Final validation loss per dataset", out / "final_val_loss.png")


_FAILED = re.compile(r".+\.failed-\d+$")


def pick_runs(paths: list[Path]) -> list[Path]:
    """The run folders among ``paths``: what a glob such as ``logs/<experiment>/*`` brings besides them after a sweep
    (its ``sweep.json``, failed runs kept aside as ``<name>.failed-<n>``, runs it records as failed) is left out
    with a note; a path that does not exist, or a folder that is not a finished run, is refused."""
    runs, notes = [], []
    failed_in_sweep: dict[Path, set[str]] = {}
    for p in paths:
        if not p.exists():
            raise ConfigError("report", f"no such run folder: {p}")
        if p.is_file():
            notes.append(f"{p.name} (a file)")
            continue
        if _FAILED.fullmatch(p.name):
            notes.append(f"{p.name} (a failed run, kept aside)")
            continue
        if p.parent not in failed_in_sweep:
            entries = sweep_entries(p.parent)
            failed_in_sweep[p.parent] = {n for n, e in entries.items()  # a failed evaluation: its training stands
                                         if e.get("state") == "failed" and e.get("step") != "evaluate"}  # fmt: skip
        if p.name in failed_in_sweep[p.parent]:  # its table, if any, is not a result (diverged, or cut short)
            notes.append(f"{p.name} (failed in the sweep)")
            continue
        runs.append(p)
    if notes:
        print("report: left out " + ", ".join(notes), file=sys.stderr)
    if not runs:
        raise ConfigError("report", "no finished run among the folders given")
    return runs


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("runs", nargs="*", help="run folders (each with validation.json and TensorBoard events)")
    p.add_argument("--out", required=True, help="folder for the tables and figures")
    p.add_argument("--reference", choices=["research"], help="put the study's published figures beside the runs")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=GLOB",
        help="after the run folders: the two arms to compare, each a glob over the folders' paths or names (e.g. "
        "fff='logs/step2_seeds/fff-*' lora='logs/step2_seeds/lora-*'); default: runs that differ only in their "
        "seed (-seed=<n>) are one arm",
    )
    args = p.parse_intermixed_args(argv)
    if args.compare:  # `--compare a=X b=Y <folders>`: the folders after it are runs, not arms
        args.runs += [c for c in args.compare if Path(c).exists() or "=" not in c]
        args.compare = [c for c in args.compare if not (Path(c).exists() or "=" not in c)] or None
    if not args.runs:
        p.error("give the run folders to report on, e.g. logs/step2_seeds/*")
    import matplotlib

    from fff_lightning import compare

    matplotlib.use("Agg")  # files only, no display needed
    folders = pick_runs([Path(r) for r in args.runs])
    runs = [read_run(f) | {"path": str(f)} for f in folders]
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):  # the same name in two experiments: tell them apart
        for run, f in zip(runs, folders, strict=True):
            run["name"] = f"{f.parent.name}/{f.name}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reference = RESEARCH if args.reference == "research" else {}
    files = write_tables(out, runs, bool(reference))
    if args.compare or any(r["seed"] is not None for r in runs):  # seeds: arms, intervals, the comparison
        arms = compare.arms_of(runs, args.compare)
        colours = _colours(list(arms))
        result = compare.comparison(arms)
        compare.print_comparison(result)
        files += compare.write_comparison(out, arms, result, reference, REFERENCE_NOTE)
        files += compare.plot_curves(out, arms, colours)
        files.append(compare.plot_bars(out, result, reference, colours))
        if result["differences"]:
            files.append(compare.plot_difference(out, result))
        if any(r["tasks"] for r in runs):
            tasks = compare.task_comparison(arms)
            compare.print_task_comparison(tasks)
            files += compare.write_task_comparison(out, arms, tasks)
    else:
        colours = _colours([r["name"] for r in runs])
        files += plot_curves(out, runs, colours)
        files.append(plot_bars(out, runs, bool(reference), colours))
        if any(r["tasks"] for r in runs):  # each run its own column
            from fff_lightning import compare

            single = {r["name"]: [r] for r in runs}
            files += compare.write_task_comparison(out, single, compare.task_comparison(single))
    print(f"report of {len(runs)} runs written to {out}: " + ", ".join(f.name for f in files))
