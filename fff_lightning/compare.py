"""Arms over seeds for ``report``: which runs are taken together, each arm's mean with its interval, the paired
difference of two arms on the same validation samples, the verdict, and their tables and figures.

An *arm* is a set of runs that differ only in their seed: by default the runs whose names are the same but for
``-seed=<n>`` (what ``sweep`` names them), or ``--compare NAME=GLOB ...``. The statistics are in
:mod:`fff_lightning.stats`.
"""

from __future__ import annotations

import json
import math
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from fff_lightning import stats
from fff_lightning.errors import ConfigError
from fff_lightning.files import write_text

#: An arm more than this far above the smallest arm's trainable count is flagged as off budget: the research's
#: own step-2 pair (129.1M against 120.6M, +7.1%) is its "equal budget" comparison.
OFF_BUDGET = 0.08

INTERVAL_NOTE = (
    "Intervals are 95%. An arm's interval is a Student-t interval over its seeds: how far another seed could move "
    "its mean, not how the validation samples themselves vary. The difference's interval is a bootstrap over the "
    "validation samples and the seed pairs together (where per-sample losses exist), widened to the t interval over "
    "the seed pairs where that is wider (a bootstrap over 3 seeds alone is too narrow). It is per dataset: with "
    "several datasets compared at once, about one interval in twenty can exclude 0 by chance alone."
)


def arms_of(runs: list[dict], compare: list[str] | None) -> dict[str, list[dict]]:
    """Runs taken together: ``--compare NAME=GLOB ...`` (``*`` and ``?`` over the run folders' paths or names;
    brackets are literal, as in run names like ``lora-[32]-2-...``), else the groups (each run's name without its
    ``-seed=<n>``). A run in two arms, or two runs of one seed in an arm, is refused: an arm is one run per seed."""
    arms: dict[str, list[dict]] = {}
    if not compare:
        for run in runs:
            arms.setdefault(run["group"], []).append(run)
    for spec in compare or []:
        name, eq, pattern = spec.partition("=")
        if not eq or not name or not pattern:
            raise ConfigError(
                "--compare",
                f"give NAME=GLOB after the run folders, e.g. fff='logs/step2_seeds/fff-*'; got {spec!r}",
            )
        if name in arms:
            raise ConfigError("--compare", f"the arm {name!r} is named twice")
        literal = pattern.replace("[", "[[]")
        arms[name] = [r for r in runs if fnmatch(r["path"], literal) or fnmatch(r["name"], literal)]
        if not arms[name]:
            raise ConfigError("--compare", f"{name}: no run among those given matches {pattern!r}")
    owner: dict[str, str] = {}
    for name, members in arms.items():
        for r in members:
            if r["path"] in owner:
                raise ConfigError(
                    "--compare", f"{r['path']} is in two arms ({owner[r['path']]} and {name}): make the globs disjoint"
                )
            owner[r["path"]] = name
    for name, members in arms.items():
        seeds: dict = {}
        for r in members:
            if r["seed"] in seeds:
                raise ConfigError(
                    "--compare" if compare else "report",
                    f"arm {name!r} has two runs of seed {r['seed']} ({seeds[r['seed']]} and {r['path']}): an arm is "
                    "one run per seed"
                    + ("" if compare else " (runs of the same name in two experiments? name the arms with --compare)"),
                )
            seeds[r["seed"]] = r["path"]
    return arms


def _pairs(a: list[dict], b: list[dict]) -> tuple[list[tuple[dict, dict]], str]:
    """Seed pairs: the same seed on both sides; arms that share no seed are paired in seed order."""
    sa, sb = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    common = sorted(k for k in set(sa) & set(sb) if k is not None)
    if common:
        return [(sa[k], sb[k]) for k in common], "matched seeds"

    def key(r):
        return (r["seed"] is None, r["seed"] or 0)

    pairs = list(zip(sorted(a, key=key), sorted(b, key=key), strict=False))
    return pairs, "seeds paired in order (the arms share no seed)"


def _loss(run: dict, dataset: str) -> float | None:
    """A run's loss on a dataset: token-weighted from its per-sample file where it has one (the same definition as
    the paired difference, whatever the table's ``val_reduction``), else its table's."""
    samples = (run["samples"] or {}).get(dataset)
    if samples:
        tokens = sum(n for n, _ in samples.values())
        return sum(v for _, v in samples.values()) / tokens if tokens else float("nan")
    return next((r["loss"] for r in run["rows"] if r["dataset"] == dataset), None)


def _sample_arrays(pairs, dataset: str):
    """Per pair, ``(loss_sums, tokens)`` of each side over the samples every run scored; ``None`` (intervals over
    seeds only) where a run has no per-sample file or the runs were validated on different samples."""
    runs = [r for p in pairs for r in p]
    tables = [(r["samples"] or {}).get(dataset) for r in runs]
    if any(t is None for t in tables):
        return None
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    if not ids or any(len({t[i][0] for t in tables}) != 1 for i in ids):  # the same samples score the same tokens
        return None
    side = [([t[i][1] for i in ids], [t[i][0] for i in ids]) for t in tables]
    return side[0::2], side[1::2]


def comparison(arms: dict[str, list[dict]]) -> dict:
    """Per dataset: each arm's mean over seeds with a t interval; for exactly two arms, the paired difference
    A - B (a bootstrap over samples and seed pairs where per-sample losses exist) and the verdict."""
    names = list(arms)
    datasets: list[str] = []
    for runs in arms.values():
        for run in runs:
            datasets += [r["dataset"] for r in run["rows"] if r["dataset"] not in datasets]
    out: dict = {"arms": names, "datasets": datasets, "intervals": {}, "differences": {}, "notes": []}
    batch_means = sorted({r["name"] for runs in arms.values() for r in runs for row in r["rows"]
                          if row.get("reduction") == "batches" and r["samples"]})  # fmt: skip
    if batch_means:
        out["notes"].append(
            f"losses here are token-weighted, from the per-sample files; the tables of {', '.join(batch_means)} are "
            "batch means (val_reduction: batches) and differ from them"
        )
    for name, runs in arms.items():
        for ds in datasets:
            values = [v for v in (_loss(r, ds) for r in runs) if v is not None]
            out["intervals"][(name, ds)] = stats.seed_interval(values) if values else None
    if len(names) != 2:
        out["notes"].append(f"no paired difference: it needs exactly two arms (here {len(names)}; see --compare)")
        return out
    pairs, how = _pairs(arms[names[0]], arms[names[1]])
    out["notes"].append(f"{names[0]} - {names[1]} over {len(pairs)} seed pairs ({how})")
    seeds_only = []
    for ds in datasets:
        arrays = _sample_arrays(pairs, ds)
        if arrays is None:
            seeds_only.append(ds)
            a, b = [_loss(x, ds) for x, _ in pairs], [_loss(y, ds) for _, y in pairs]
            if None in a or None in b:
                continue
            d = stats.paired_difference(a, b)
        else:
            d = stats.paired_difference(*arrays)
        out["differences"][ds] = (d, stats.verdict(d, names[0], names[1]))
    if seeds_only:
        lacking = sorted({r["name"] for p in pairs for r in p if not r["samples"]})
        why = "the runs were validated on different samples"
        if lacking:
            why = f"no per-sample losses in {', '.join(lacking)} (validated before fff_lightning wrote them)"
        out["notes"].append(f"intervals over seeds only for {', '.join(seeds_only)}: {why}")
    return out


def _task_metrics(arms: dict[str, list[dict]]) -> list[tuple[str, str, bool | None]]:
    """``(task, metric, higher_is_better)`` of every task metric any run was evaluated on, in order."""
    seen: dict[tuple[str, str], bool | None] = {}
    for runs in arms.values():
        for run in runs:
            for task, doc in (run.get("tasks") or {}).items():
                better = doc.get("higher_is_better") or {}
                for metric in doc["metrics"]:
                    seen.setdefault((task, metric), better.get(metric.split(",")[0]))
    return [(t, m, b) for (t, m), b in seen.items()]


def _task_arrays(pairs, task: str, metric: str):
    """Per pair, ``(numerators, denominators)`` of each side over the items every run scored, or ``None``."""
    runs = [r for p in pairs for r in p]
    tables = [((r.get("tasks") or {}).get(task) or {}).get("items", {}).get(metric) for r in runs]
    if any(not t for t in tables):
        return None
    ids = sorted(set.intersection(*(set(t) for t in tables)))
    if not ids:
        return None
    side = [([t[i][0] for i in ids], [t[i][1] for i in ids]) for t in tables]
    return side[0::2], side[1::2]


def _task_value(run: dict, task: str, metric: str) -> float | None:
    v = ((run.get("tasks") or {}).get(task) or {}).get("metrics", {}).get(metric)
    return float(v) if isinstance(v, int | float) else None


#: What must be the same for two evaluations of a task to be compared.
_SETTINGS = ("limit", "num_fewshot", "chat", "seed", "max_gen_toks", "max_length")


def task_comparison(arms: dict[str, list[dict]]) -> dict:
    """Per task metric (``evaluate``'s results in each run's ``eval/``): each arm's mean over seeds with a t
    interval; for two arms, the paired difference A - B over the same items and seed pairs (the bootstrap the
    losses get) and the verdict, worded by the metric's direction (``A higher`` for accuracy, ``A lower`` for bits
    per byte)."""
    names = list(arms)
    out: dict = {"metrics": [], "intervals": {}, "differences": {}, "notes": []}
    for task in dict.fromkeys(t for t, _, _ in _task_metrics(arms)):
        how = {tuple((k, str(doc.get(k))) for k in _SETTINGS) for runs in arms.values() for r in runs
               if (doc := (r.get("tasks") or {}).get(task))}  # fmt: skip
        if len(how) > 1:
            differ = sorted({k for h in how for k, v in h if len({dict(x)[k] for x in how}) > 1})
            out["notes"].append(f"{task}: the runs were evaluated with different {', '.join(differ)}: their scores "
                                "are not of the same prompts or items")  # fmt: skip
    for task, metric, better in _task_metrics(arms):
        key = f"{task}: {metric}"
        out["metrics"].append((key, better))
        for name, runs in arms.items():
            values = [v for v in (_task_value(r, task, metric) for r in runs) if v is not None]
            out["intervals"][(name, key)] = stats.seed_interval(values) if values else None
        if len(names) != 2:
            continue
        pairs, _ = _pairs(arms[names[0]], arms[names[1]])
        arrays = _task_arrays(pairs, task, metric)
        if arrays is None:
            a, b = [_task_value(x, task, metric) for x, _ in pairs], [_task_value(y, task, metric) for _, y in pairs]
            if not pairs or None in a or None in b:
                out["notes"].append(f"{key}: not every run of both arms was evaluated on it (no difference)")
                continue
            d = stats.paired_difference(a, b)
        else:
            d = stats.paired_difference(*arrays)
        v = stats.verdict(d, names[0], names[1])
        if better:  # "A lower" of a score is "B higher"
            v = {f"{names[0]} lower": f"{names[1]} higher", f"{names[1]} lower": f"{names[0]} higher"}.get(v, v)
        out["differences"][key] = (d, v)
    return out


def write_task_comparison(out: Path, arms: dict[str, list[dict]], result: dict) -> list[Path]:
    """``tasks.md`` and ``tasks.json``: the task metrics' intervals per arm, their differences and verdicts."""
    names = list(arms)
    md = ["| task: metric | " + " | ".join(f"{n} (n={len(arms[n])})" for n in names) + " |",
          "|---|" + "---:|" * len(names)]  # fmt: skip
    for key, better in result["metrics"]:
        cells = [(i.text() if (i := result["intervals"][(n, key)]) else "") for n in names]
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(better, "")
        md.append(f"| {key}{arrow} | " + " | ".join(cells) + " |")
    md += ["", "Mean over seeds [95% interval] (n = seeds) of each task metric (`evaluate`)."]
    if result["differences"]:
        md += ["", *_difference_md("task: metric", names, result["differences"])]
        md += ["", "The difference's interval is a bootstrap over the task's items and the seed pairs together, "
               "widened to the t interval over the pairs where that is wider, as for the losses."]  # fmt: skip
    md += result["notes"]
    write_text(out / "tasks.md", "\n".join(md) + "\n")
    data = {
        "arms": [{"metric": k, "arm": n, "mean": i.mean, "low": i.low, "high": i.high, "n": i.n}
                 for k, _ in result["metrics"] for n in names if (i := result["intervals"][(n, k)])],
        "higher_is_better": dict(result["metrics"]),
        "differences": _difference_json(result["differences"]),
        "notes": result["notes"],
    }  # fmt: skip
    write_text(out / "tasks.json", json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    return [out / "tasks.md", out / "tasks.json"]


def print_task_comparison(result: dict) -> None:
    for key, _ in result["metrics"]:
        parts = [f"{n} {i.text()}" for (n, k), i in result["intervals"].items() if k == key and i]
        print(_line(key, parts, result["differences"]))


def budget_notes(arms: dict[str, list[dict]]) -> dict[str, str]:
    """Each arm's trainable count, flagged where it is over :data:`OFF_BUDGET` above the smallest arm's."""
    counts = {n: next((r["trainable"] for r in runs if r.get("trainable")), None) for n, runs in arms.items()}
    known = [c for c in counts.values() if c]
    notes = {}
    for n, c in counts.items():
        if c is None:
            notes[n] = "unknown (no adapter folder)"
            continue
        off = (c - min(known)) / min(known)
        notes[n] = f"{c:,}" + (f" (OFF BUDGET: {off:+.1%} of the smallest arm)" if off > OFF_BUDGET else "")
    return notes


def write_comparison(
    out: Path, arms: dict[str, list[dict]], result: dict, reference: dict[str, dict], reference_note: str
) -> list[Path]:
    """``comparison.md`` and ``comparison.json``: the arms' intervals per dataset, the difference and verdicts."""
    names, datasets = result["arms"], result["datasets"]
    budgets = budget_notes(arms)
    columns = [f"{n} (n={len(arms[n])})" for n in names] + list(reference)
    md = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for ds in datasets:
        cells = [(result["intervals"][(n, ds)].text() if result["intervals"][(n, ds)] else "") for n in names]
        cells += [f"{ref[ds]:.3f} (one run)" if ds in ref else "" for ref in reference.values()]
        md.append(f"| {ds} | " + " | ".join(cells) + " |")
    md.append("| trainable parameters | " + " | ".join([budgets[n] for n in names] + [""] * len(reference)) + " |")
    md += ["", "Mean validation loss over seeds [95% interval] (n = seeds); lower is better."]
    if result["differences"]:
        md += ["", *_difference_md("dataset", names, result["differences"])]
    md += ["", *result["notes"], "", INTERVAL_NOTE]
    if reference:
        md += ["", "The published figures are single runs (one seed each): they have no interval. " + reference_note]
    write_text(out / "comparison.md", "\n".join(md) + "\n")
    rows = [
        {"dataset": ds, "arm": n, "mean": i.mean, "low": i.low, "high": i.high, "n": i.n}
        for ds in datasets
        for n in names
        if (i := result["intervals"][(n, ds)])
    ]
    diffs = _difference_json(result["differences"])
    runs = {n: [r["name"] for r in arms[n]] for n in names}
    data = {"arms": rows, "runs": runs, "budgets": budgets, "differences": diffs, "notes": result["notes"]}
    write_text(out / "comparison.json", json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    return [out / "comparison.md", out / "comparison.json"]


def _difference_md(label: str, names: list[str], differences: dict) -> list[str]:
    """The Markdown table of the paired differences A - B, one row per dataset or task metric."""
    a, b = names
    md = [f"| {label} | {a} - {b} | 95% interval | method | verdict |", "|---|---:|---|---|---|"]
    for key, (d, v) in differences.items():
        md.append(f"| {key} | {d.mean:+.4f} | [{d.low:+.4f}, {d.high:+.4f}] | {d.method}, n={d.n} | {v} |")
    return md


def _difference_json(differences: dict) -> dict:
    return {k: {"difference": d.mean, "low": d.low, "high": d.high, "n": d.n, "method": d.method, "verdict": v}
            for k, (d, v) in differences.items()}  # fmt: skip


def _line(key: str, parts: list[str], differences: dict) -> str:
    """One printed line: each arm's interval, and the difference with its verdict where there is one."""
    line = f"{key}: " + "; ".join(parts)
    if key in differences:
        d, v = differences[key]
        line += f" -> {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]: {v}"
    return line


def _finite(x):
    """``x`` with every NaN or infinity as ``None`` (JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def print_comparison(result: dict) -> None:
    for ds in result["datasets"]:
        parts = [f"{n} {result['intervals'][(n, ds)].text()}" for n in result["arms"] if result["intervals"][(n, ds)]]
        print(_line(ds, parts, result["differences"]))
    for note in result["notes"]:
        print(note)


def save_bars(fig, ax, datasets: list[str], title: str, path: Path) -> Path:
    """Label a per-dataset bar figure of final validation losses, save it to ``path`` and close it."""
    import matplotlib.pyplot as plt

    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets)
    ax.set_title(title)
    ax.set_xlabel("dataset")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(out: Path, result: dict, reference: dict[str, dict], colours: dict) -> Path:
    """Final validation loss per dataset: one bar per arm (its mean over seeds) with its 95% interval, and the
    published single runs as hatched outlines."""
    import matplotlib.pyplot as plt

    names, datasets = result["arms"], result["datasets"]
    columns = names + list(reference)
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(10, 1.6 * len(datasets) + 0.3 * len(columns) + 4), 5.5))
    for j, name in enumerate(columns):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(datasets))]
        if name in reference:
            ys = [reference[name].get(ds, 0) for ds in datasets]
            hatch = "//" if "LoRA" in name else ".."
            ax.bar(xs, ys, width, label=f"{name}, one run", color="white", edgecolor="black", hatch=hatch)
            continue
        iv = [result["intervals"][(name, ds)] for ds in datasets]
        ys = [i.mean if i else 0 for i in iv]
        low = [(i.mean - i.low) if i and i.n > 1 else 0 for i in iv]
        high = [(i.high - i.mean) if i and i.n > 1 else 0 for i in iv]
        n = max((i.n for i in iv if i), default=0)
        label = f"{name} (mean of {n} seeds, 95% interval)"
        ax.bar(xs, ys, width, yerr=[low, high], capsize=4, label=label, color=colours[name])
    title = "Final validation loss per dataset: mean over seeds, 95% t interval"
    return save_bars(fig, ax, datasets, title, out / "final_val_loss.png")


def plot_difference(out: Path, result: dict) -> Path:
    """The paired difference A - B per dataset with its 95% interval, against 0: the verdict, drawn."""
    import matplotlib.pyplot as plt

    a, b = result["arms"]
    rows = list(result["differences"].items())
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.7 * len(rows)))
    for y, (_, (d, verdict)) in enumerate(rows):
        colour = "tab:blue" if d.high < 0 else "tab:red" if d.low > 0 else "tab:gray"
        ax.errorbar(d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color=colour, capsize=5)
        ax.annotate(verdict, (d.high, y), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([ds for ds, _ in rows])
    ax.invert_yaxis()
    title = f"A = {a}\nB = {b}\nA - B: paired difference in validation loss, 95% interval (left of 0: A lower)"
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel("A - B, cross-entropy loss (nats per token)")
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.35)
    fig.tight_layout()
    fig.savefig(out / "difference.png", dpi=120)
    plt.close(fig)
    return out / "difference.png"


def save_curve(fig, ax, title: str, tag: str, drawn: int, path: Path) -> Path:
    """Label a loss-over-steps figure (or say that nothing was logged), save it to ``path`` and close it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    else:
        ax.text(0.5, 0.5, f"no '{tag}' values logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(out: Path, arms: dict[str, list[dict]], colours: dict) -> list[Path]:
    """Training and validation loss per arm: the mean over seeds at each step every seed logged, and a band from
    the lowest to the highest seed."""
    import matplotlib.pyplot as plt

    files = []
    for tag, title, fname in (
        ("train/loss", "Training loss (mean over seeds, band: lowest to highest seed)", "train_loss.png"),
        ("val/loss", "Validation loss (all datasets; mean over seeds, band: lowest to highest)", "val_loss.png"),
    ):
        fig, ax = plt.subplots(figsize=(12, 5.5))
        drawn = 0
        for name, runs in arms.items():
            series = [dict(r["curves"].get(tag, [])) for r in runs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if all(series) else []
            if not steps:
                if all(series) and len(series) > 1:  # e.g. runs from before and after the steps moved by one
                    print(
                        f"note: {tag} of {name} is not drawn: its seeds' runs share no logged step (runs logged "
                        "by different versions? before 2026-12-08 a step N was logged at N - 1)",
                        file=sys.stderr,
                    )
                continue
            vals = np.array([[s[k] for k in steps] for s in series])  # (seeds, steps)
            label = f"{name} ({len(runs)} seeds)"
            if len(steps) < 3:  # a band over one or two steps is too thin to see: ranges as bars, side by side
                spread = [vals.mean(0) - vals.min(0), vals.max(0) - vals.mean(0)]
                dodge = (list(arms).index(name) - (len(arms) - 1) / 2) * 0.06
                xs = [x + dodge for x in steps]
                ax.errorbar(xs, vals.mean(0), yerr=spread, fmt="o", color=colours[name], capsize=4, label=label)
                ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
            else:
                marker = "o" if len(steps) < 20 else None
                ax.plot(steps, vals.mean(0), label=label, color=colours[name], marker=marker, markersize=3)
                ax.fill_between(steps, vals.min(0), vals.max(0), color=colours[name], alpha=0.2, linewidth=0)
            drawn += 1
        files.append(save_curve(fig, ax, title, tag, drawn, out / fname))
    return files
