"""Seeds in ``sweep``, per-sample losses from validation, and ``report``'s intervals and verdicts."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ENV, QUICK

from fff_lightning import stats
from fff_lightning.report import main as report_main


def test_seed_interval_is_scipys_t_interval():
    from scipy import stats as st

    x = [0.457, 0.463, 0.451, 0.470]
    got = stats.seed_interval(x)
    low, high = st.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=st.sem(x))
    assert (got.mean, got.n) == (pytest.approx(np.mean(x)), 4)
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    one = stats.seed_interval([0.5])
    assert one.n == 1 and math.isnan(one.low) and "no interval" in one.text()


def test_paired_difference_without_samples_is_a_t_interval_over_the_pairs():
    from scipy import stats as st

    a, b = [0.50, 0.52, 0.49], [0.47, 0.495, 0.462]
    d = [x - y for x, y in zip(a, b, strict=True)]
    got = stats.paired_difference(a, b)
    low, high = st.t.interval(0.95, 2, loc=np.mean(d), scale=st.sem(d))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high)) and got.n == 3
    assert "no per-sample" in got.method
    assert stats.verdict(got, "fff", "lora") == "lora lower"  # the interval is above 0
    wide = stats.paired_difference([0.50, 0.52, 0.49], [0.47, 0.50, 0.48])  # differences 0.03, 0.02, 0.01
    assert stats.verdict(wide) == "no resolvable difference (95%)"  # t with 2 degrees of freedom: 4.3 x sem


def test_paired_bootstrap_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 200, size=300)
    base = rng.gamma(2.0, 0.5, size=300) * tokens
    noise = lambda: base * rng.normal(1, 0.02, size=300)  # noqa: E731  (a seed's wobble on each sample)
    shifted = [(noise() * 1.05, tokens) for _ in range(3)]
    same_a = [(noise(), tokens) for _ in range(3)]
    same_b = [(noise(), tokens) for _ in range(3)]
    d = stats.paired_difference(shifted, same_a)
    assert d.low > 0 and stats.verdict(d) == "B lower"
    n = stats.paired_difference(same_a, same_b)
    assert n.low < 0 < n.high and stats.verdict(n) == "no resolvable difference (95%)"
    again = stats.paired_difference(same_a, same_b)
    assert (again.low, again.high) == (n.low, n.high)  # a fixed generator: the same report twice
    # the widened interval contains the plain t interval over the pairs
    per_pair = [a.sum() / t.sum() - b.sum() / t.sum() for (a, t), (b, _) in zip(same_a, same_b, strict=True)]
    t = stats.seed_interval(per_pair)
    assert n.low <= t.low and n.high >= t.high


def _sweep(tmp_path: Path, steps: int = 4) -> tuple[Path, subprocess.CompletedProcess]:
    grid = {
        "sweep": {
            "experiment": "seeds",
            "configs": [QUICK],
            "validate": False,  # fit's last validation writes the table and the per-sample file
            "set": {"trainer.max_steps": steps, "trainer.val_check_interval": steps, "trainer.logger": True},
            "seeds": [12, 13, 14],
            "arms": {
                "trained": {},
                # lr ~0 (the config refuses 0): the adapters stay at their initial draws; and seed 14 fails
                "frozen": {"set": {"model.lr": 1.0e-12,
                                   "trainer.callbacks+": {"class_path": "faults.FailForSeed", "init_args": {"seed": 14}}}},
                "reseeded": {"seeds": [15, 16, 17]},  # like trained, other seeds only
            },
        }
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    cmd = [sys.executable, "-m", "fff_lightning", "sweep", "--config", str(path), "--logs_dir", str(tmp_path)]
    cmd.append("--quiet")
    return path, subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    grid, out = _sweep(tmp)
    return tmp, grid, out


@pytest.mark.slow
def test_a_planted_difference_is_found_and_seeds_alone_are_not(seeded, capsys):
    tmp, grid, out = seeded
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # one seed failed
    exp = tmp / "seeds"
    status = json.loads((exp / "sweep.json").read_text())
    failed = [n for n, e in status.items() if e["state"] == "failed"]
    assert len(failed) == 1 and failed[0].startswith("frozen-") and failed[0].endswith("-seed=14")
    assert "planted failure for seed 14" in status[failed[0]]["error"]
    runs = [p for p in exp.iterdir() if p.is_dir()]
    assert all((p / "validation_samples.parquet").is_file() for p in runs if p.name != failed[0])

    rep = tmp / "planted"
    report_main([str(p) for p in sorted(exp.iterdir())] + ["--out", str(rep), "--compare", "trained=*trained-*",
                                                             "frozen=*frozen-*"])  # fmt: skip
    result = json.loads((rep / "comparison.json").read_text())
    assert {r["arm"]: r["n"] for r in result["arms"]} == {"trained": 3, "frozen": 2}  # the failed seed is left out
    assert result["differences"] and all(d["verdict"] == "trained lower" for d in result["differences"].values())
    assert all("bootstrap over samples and seed pairs" in d["method"] for d in result["differences"].values())
    md = (rep / "comparison.md").read_text()
    assert "frozen (n=2)" in md and "| trainable parameters | 57,600 | 57,600 |" in md
    for png in ("final_val_loss.png", "train_loss.png", "val_loss.png", "difference.png"):
        assert (rep / png).stat().st_size > 10_000

    null = tmp / "null"
    report_main([str(p) for p in sorted(exp.iterdir())] + ["--out", str(null), "--compare", "trained=*trained-*",
                                                             "reseeded=*reseeded-*"])  # fmt: skip
    result = json.loads((null / "comparison.json").read_text())
    verdicts = {ds: d["verdict"] for ds, d in result["differences"].items()}
    assert len(verdicts) == 4 and set(verdicts.values()) == {"no resolvable difference (95%)"}, verdicts
    assert "seeds paired in order" in " ".join(result["notes"])


@pytest.mark.slow
def test_a_rerun_skips_finished_seeds_and_old_runs_get_intervals_over_seeds_only(seeded, tmp_path):
    tmp, grid, _ = seeded
    cmd = [sys.executable, "-m", "fff_lightning", "sweep", "--config", str(grid), "--logs_dir", str(tmp), "--dry-run"]
    listed = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300).stdout
    assert listed.count("-seed=") == 9 and listed.count("(finished: skipped)") == 8
    again = subprocess.run(cmd[:-1] + ["--quiet"], capture_output=True, text=True, env=ENV, timeout=600)
    assert "9 runs, 8 already finished, 1 to run" in again.stdout  # only the failed seed runs again (and fails)

    # Runs from before the per-sample file: copy two arms without it
    import shutil

    old = tmp_path / "old"
    for p in (tmp / "seeds").iterdir():
        if p.is_dir() and (p / "validation.json").is_file() and not p.name.startswith("reseeded"):
            shutil.copytree(p, old / p.name)
            (old / p.name / "validation_samples.parquet").unlink()
    rep = tmp_path / "rep"
    # --compare before the folders: the folders after it are still runs
    report_main(["--compare", "trained=*trained-*", "frozen=*frozen-*", *map(str, old.iterdir()), "--out", str(rep)])
    result = json.loads((rep / "comparison.json").read_text())
    assert all("no per-sample" in d["method"] for d in result["differences"].values())
    assert "intervals over seeds only" in " ".join(result["notes"])
    assert result["budgets"] == {"trained": "57,600", "frozen": "57,600"}  # no sweep.json: read from the adapters


def test_grids_name_shipped_configs_and_arms_may_bring_their_own(tmp_path):
    from fff_lightning import config_files
    from fff_lightning.errors import ConfigError
    from fff_lightning.sweep import load_grid

    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump({"sweep": {"experiment": "x", "seeds": [1, 2], "arms": {"a": {"configs": ["quickstart"]}}}})
    )
    grid = load_grid(path)
    assert grid.configs == [] and grid.arms["a"]["configs"] == [str(config_files.folder() / "quickstart.yaml")]
    for bad, field in (
        ({"experiment": "x", "seeds": [1], "arms": {"a": {}}}, "sweep.configs"),  # an arm without configs, none shared
        ({"experiment": "x", "configs": ["quickstart"], "seeds": [1, 1]}, "sweep.seeds"),
        ({"experiment": "x", "configs": ["quickstart"], "seeds": [True]}, "sweep.seeds"),
        ({"experiment": "x", "configs": ["quickstart"], "arms": {"a b": {}}}, "sweep.arms"),
        ({"experiment": "x", "configs": ["quickstart"], "arms": {"a": {"lr": 1}}}, "sweep.arms.a"),
    ):
        path.write_text(yaml.safe_dump({"sweep": bad}))
        with pytest.raises(ConfigError) as e:
            load_grid(path)
        assert e.value.field == field, (bad, e.value)
