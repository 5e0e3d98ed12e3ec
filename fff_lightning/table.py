"""The per-dataset validation table: rows from the loss sums, printed, and written as JSON, CSV and Markdown.

A row's loss is the token-weighted mean cross-entropy of the dataset: the sum of every scored token's loss
divided by the number of scored tokens (see :class:`fff_lightning.module.FFFModule`). ``seen_in_training`` marks
a dataset whose validation rows are also training rows (ArtificialThinkerSet in the research): its loss is not
held-out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = ["run", "dataset", "rows", "tokens", "loss", "ppl", "seen_in_training", "reduction", "finite"]
REDUCTIONS = ("tokens", "batches")
REDUCTION_NOTES = {
    "tokens": "loss: token-weighted mean cross-entropy (every scored token weighs the same)",
    "batches": "loss: mean of per-batch mean losses, weighted by batch size (Hugging Face's eval_loss, as the "
    "research's table); it depends on the validation batch size",
}
SEEN_NOTE = "`seen_in_training`: the validation rows are also training rows, so that loss is not held-out."


def row(
    dataset: str,
    loss_sum: float,
    tokens: float,
    samples: float,
    batch_sum: float = 0.0,
    reduction: str = "tokens",
    nonfinite_batches: int = 0,
) -> dict:
    """One dataset's row from its sums over the whole validation set: the summed token losses and token count,
    the sample count, the sum of each batch's mean loss times its sample count, and how many batches had a loss
    that is not finite (then the row's loss is NaN or infinite, never a number that looks fine)."""
    if reduction == "batches":
        mean = batch_sum / samples if samples else float("nan")
    else:
        mean = loss_sum / tokens if tokens else float("nan")
    return {
        "dataset": dataset,
        "rows": int(samples),
        "tokens": int(tokens),
        "loss": mean,
        "ppl": _exp(mean),
        "reduction": reduction,
        "finite": math.isfinite(mean),
        "nonfinite_batches": nonfinite_batches,
    }


def overall_loss(rows: list[dict]) -> float:
    """The token-weighted mean over every dataset of the table."""
    tokens = sum(r["tokens"] for r in rows)
    return sum(r["loss"] * r["tokens"] for r in rows) / max(tokens, 1)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def show(title: str, rows: list[dict], seen: dict[str, bool]) -> None:
    """Print the table to the terminal (with the untrained model's loss beside each row's, where it is known)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    before = any("loss_before" in r for r in rows)
    table = Table(title=escape(title), title_justify="left")
    cols = ["dataset", "rows", "tokens", *(["before training"] if before else []), "mean loss", "perplexity"]
    for col in [*cols, "seen in training"]:
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for r in rows:
        mark = "[yellow]YES[/yellow]" if seen.get(r["dataset"]) else "no"
        loss = f"{r['loss']:.4f}" if r.get("finite", True) else f"[bold red]{r['loss']} (NOT FINITE)[/bold red]"
        first = [f"{r['loss_before']:.4f}" if "loss_before" in r else "-"] if before else []
        table.add_row(r["dataset"], f"{r['rows']:,}", f"{r['tokens']:,}", *first, loss, f"{r['ppl']:.2f}", mark)
    Console().print(table)
    if before:
        print("before training: the same rows, scored before this fit's first step (trainer.num_sanity_val_steps: -1)")
    print(REDUCTION_NOTES[rows[0].get("reduction", "tokens")] if rows else "")
    for r in rows:
        if not r.get("finite", True):
            print(f"NOT FINITE: {r['dataset']}: the loss is {r['loss']} ({r.get('nonfinite_batches', '?')} batch(es) "
                  "not finite): the adapters diverged or the model overflowed; this table is not a result")  # fmt: skip
    if any(seen.values()):
        print("YES: these validation rows were also training rows; their loss is not held-out.")


def write(folder: str | Path, rows: list[dict], seen: dict[str, bool], run: str) -> list[Path]:
    """``validation.json``, ``validation.csv`` and ``validation.md`` in ``folder``; returns their paths."""
    from fff_lightning.files import write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = [
        {"reduction": "tokens", "finite": True, **r, "seen_in_training": seen.get(r["dataset"], False), "run": run}
        for r in rows
    ]
    write_text(folder / "validation.json", json.dumps(full, indent=2) + "\n")
    csv = [",".join(COLUMNS)] + [",".join(_fmt(r[c]) for c in COLUMNS) for r in full]
    write_text(folder / "validation.csv", "\n".join(csv) + "\n")
    cols = COLUMNS + (["loss_before"] if any("loss_before" in r for r in full) else [])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in full]
    md.append("\n" + SEEN_NOTE)
    if "loss_before" in cols:
        md.append("\n`loss_before`: the same rows, scored before this fit's first step.")
    if rows:
        md.append("\n" + REDUCTION_NOTES[rows[0].get("reduction", "tokens")] + ".")
    write_text(folder / "validation.md", "\n".join(md) + "\n")
    return [folder / f"validation.{e}" for e in ("json", "csv", "md")]


def with_before(rows: list[dict], first: list[dict] | None) -> list[dict]:
    """``rows`` with each dataset's loss before training (``loss_before``) from ``first``, where it has it."""
    losses = {r["dataset"]: r["loss"] for r in first or []}
    return [{**r, "loss_before": losses[r["dataset"]]} if r["dataset"] in losses else r for r in rows]


def report(folder: str | Path, rows: list[dict], seen: dict[str, bool], run: str, what: str) -> list[Path]:
    """Print the table under ``what: run`` and write its three files to ``folder``."""
    show(f"{what}: {run}", rows, seen)
    files = write(folder, rows, seen, run)
    print(f"table written to {', '.join(str(f) for f in files)}")
    return files


def _fmt(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else str(v)


SAMPLES_FILE = "validation_samples.parquet"


def write_samples(folder: str | Path, samples: list[dict]) -> Path:
    """``validation_samples.parquet``: one row per validation sample -- dataset, sample (its index in the
    dataset's validation rows), scored tokens, summed loss (nats) -- so statistics over samples need no re-run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fff_lightning.files import atomic_file

    table = pa.table(
        {
            "dataset": pa.array([r["dataset"] for r in samples], pa.string()),
            "sample": pa.array([r["sample"] for r in samples], pa.int64()),
            "tokens": pa.array([r["tokens"] for r in samples], pa.int64()),
            "loss_sum": pa.array([r["loss_sum"] for r in samples], pa.float64()),
        }
    )
    dest = Path(folder) / SAMPLES_FILE
    with atomic_file(dest, "wb") as fh:
        pq.write_table(table, fh)
    return dest


def read_samples(folder: str | Path) -> dict[str, dict[int, tuple[int, float]]] | None:
    """``{dataset: {sample: (tokens, loss_sum)}}`` of a run folder's per-sample file, or ``None`` without one
    (runs from before it existed). A damaged file is refused in one line."""
    from fff_lightning.errors import ConfigError

    path = Path(folder) / SAMPLES_FILE
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path).to_pydict()
        out: dict = {}
        for d, i, n, v in zip(t["dataset"], t["sample"], t["tokens"], t["loss_sum"], strict=True):
            out.setdefault(d, {})[int(i)] = (int(n), float(v))
    except Exception as e:  # pyarrow raises its own types for a damaged or foreign file
        raise ConfigError("report", f"{path} is not a per-sample table ({type(e).__name__})") from None
    return out
