"""Seeds in ``sweep``, per-sample losses from validation, and ``report``'s intervals and verdicts."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import QUICK, run_cli

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
    # samples with no scored token (answers cut off by max_seq_length) weigh nothing: no 0/0 in any replicate
    few = np.array([0, 0, 0, 0, 0, 0, 40, 50])
    cut_a = [(few * 1.10 * s, few) for s in (1.0, 1.01, 0.99)]
    cut_b = [(few * 1.00 * s, few) for s in (1.0, 0.99, 1.01)]
    c = stats.paired_difference(cut_a, cut_b)
    assert np.isfinite(c.low) and np.isfinite(c.high) and stats.verdict(c) != "no resolvable difference (95%)"


def _sweep(tmp_path: Path, steps: int = 4) -> tuple[Path, subprocess.CompletedProcess]:
    grid = {
        "sweep": {
            "experiment": "seeds",
            "configs": [QUICK],
            "validate": False,  # fit's last validation writes the table and the per-sample file
            "set": {"trainer.max_steps": steps, "trainer.val_check_interval": steps, "trainer.logger": True},
            "seeds": [12, 13],
            "evaluate": {"tasks": ["fff_math_bpb"], "limit": 10, "batch_size": 10},  # each finished run, on 10 items
            "arms": {
                "trained": {},
                # lr ~0 (the config refuses 0): the adapters stay at their initial draws; and seed 14 fails
                "frozen": {"seeds": [12, 13, 14], "set": {"model.lr": 1.0e-12,
                                   "trainer.callbacks+": {"class_path": "faults.FailForSeed", "init_args": {"seed": 14}}}},
                "reseeded": {"seeds": [15, 16]},  # like trained, other seeds only
            },
        }
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path, run_cli(["sweep", "--config", str(path), "--logs_dir", str(tmp_path), "--quiet"], timeout=900)


@pytest.mark.slow
def test_a_seeds_sweep_finds_a_planted_difference_and_reruns_only_what_is_unfinished(tmp_path, monkeypatch, capsys):
    """One 7-run sweep (a third of the suite's time once) read by both checks: one test, so that xdist's workers
    never run the sweep twice."""
    (tmp_path / "sweep").mkdir()
    grid, out = _sweep(tmp_path / "sweep")
    a_planted_difference_is_found_and_seeds_alone_are_not(tmp_path / "sweep", out)
    a_rerun_skips_finished_seeds_and_old_runs_get_intervals_over_seeds_only(tmp_path / "sweep", grid, tmp_path,
                                                                            monkeypatch, capsys)  # fmt: skip


def a_planted_difference_is_found_and_seeds_alone_are_not(tmp, out):
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
    assert {r["arm"]: r["n"] for r in result["arms"]} == {"trained": 2, "frozen": 2}  # frozen's failed seed is left out
    assert result["differences"] and all(d["verdict"] == "trained lower" for d in result["differences"].values())
    assert all("bootstrap over samples and seed pairs" in d["method"] for d in result["differences"].values())
    md = (rep / "comparison.md").read_text()
    assert "frozen (n=2)" in md and "| trainable parameters | 57,600 | 57,600 |" in md
    for png in ("final_val_loss.png", "train_loss.png", "val_loss.png", "difference.png"):
        assert (rep / png).stat().st_size > 10_000
    # The task metric of evaluate: per arm over seeds, and paired over the same items and seeds
    tasks = json.loads((rep / "tasks.json").read_text())
    assert {(r["metric"], r["arm"], r["n"]) for r in tasks["arms"]} == {
        ("fff_math_bpb: bits_per_byte", "trained", 2),
        ("fff_math_bpb: bits_per_byte", "frozen", 2),
    }
    (d,) = tasks["differences"].values()
    # 4 steps move bits per byte a little: lower in both pairs, too little to resolve over 2 seeds and 10 items
    assert d["difference"] < 0 and "bootstrap over samples and seed pairs" in d["method"], d
    assert d["verdict"] in ("trained lower", "no resolvable difference (95%)"), d
    assert tasks["higher_is_better"] == {"fff_math_bpb: bits_per_byte": False}

    null = tmp / "null"
    report_main([str(p) for p in sorted(exp.iterdir())] + ["--out", str(null), "--compare", "trained=*trained-*",
                                                             "reseeded=*reseeded-*"])  # fmt: skip
    result = json.loads((null / "comparison.json").read_text())
    verdicts = {ds: d["verdict"] for ds, d in result["differences"].items()}
    assert len(verdicts) == 4 and set(verdicts.values()) == {"no resolvable difference (95%)"}, verdicts
    assert "seeds paired in order" in " ".join(result["notes"])


def a_rerun_skips_finished_seeds_and_old_runs_get_intervals_over_seeds_only(tmp, grid, tmp_path, monkeypatch, capsys):
    from fff_lightning.sweep import main as sweep_main

    capsys.readouterr()
    # A run whose evaluation is gone is evaluated again, not trained again
    import shutil

    (evaluated,) = [p for p in (tmp / "seeds").iterdir() if p.name.startswith("trained-") and p.name.endswith("=12")]
    shutil.rmtree(evaluated / "eval")
    adapter = (evaluated / "adapter" / "adapter_model.safetensors").read_bytes()
    sweep_main(["--config", str(grid), "--logs_dir", str(tmp), "--dry-run"])  # in this process: no start-up to pay
    listed = capsys.readouterr().out
    assert listed.count("-seed=") == 7 and listed.count("(finished: skipped)") == 5
    assert listed.count("(trained: evaluated only)") == 1
    # the same grid by another path, from another folder: the same runs, still finished
    monkeypatch.chdir(grid.parent)
    sweep_main(["--config", grid.name, "--logs_dir", str(tmp), "--dry-run"])
    other = capsys.readouterr().out
    assert other.count("(finished: skipped)") == 5, other
    again = run_cli(["sweep", "--config", str(grid), "--logs_dir", str(tmp), "--quiet"])
    assert "7 runs, 5 already finished, 2 to run" in again.stdout  # the failed seed again (it fails), the evaluation
    assert (evaluated / "eval" / "fff_math_bpb.json").is_file()
    assert (evaluated / "adapter" / "adapter_model.safetensors").read_bytes() == adapter  # not trained again

    # Runs from before the per-sample file: copy two arms without it

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
        yaml.safe_dump({"sweep": {"experiment": "x", "seeds": [1, 2], "arms": {"a": {"configs": ["tiny"]}}}})
    )
    grid = load_grid(path)
    assert grid.configs == [] and grid.arms["a"]["configs"] == [str(config_files.folder() / "tiny.yaml")]
    for bad, field in (
        ({"experiment": "x", "seeds": [1], "arms": {"a": {}}}, "sweep.configs"),  # an arm without configs, none shared
        ({"experiment": "x", "configs": ["tiny"], "seeds": [1, 1]}, "sweep.seeds"),
        ({"experiment": "x", "configs": ["tiny"], "seeds": [True]}, "sweep.seeds"),
        ({"experiment": "x", "configs": ["tiny"], "arms": {"a b": {}}}, "sweep.arms"),
        ({"experiment": "x", "configs": ["tiny"], "arms": {"a": {"lr": 1}}}, "sweep.arms.a"),
        (
            {"experiment": "x", "configs": ["tiny"], "seeds": [1], "evaluate": {"tasks": ["fff_mth"]}},
            "sweep.evaluate.tasks",
        ),  # a misspelt task: before anything trains
        (
            {"experiment": "x", "configs": ["tiny"], "seeds": [1], "evaluate": {"tasks": "fff_math", "top_k": 1}},
            "sweep.evaluate.top_k",
        ),
    ):
        path.write_text(yaml.safe_dump({"sweep": bad}))
        with pytest.raises(ConfigError) as e:
            load_grid(path)
        assert e.value.field == field, (bad, e.value)


def _run(path: str, seed, loss=0.5, samples=None) -> dict:
    rows = [{"dataset": "d", "loss": loss, "reduction": "tokens"}]
    return {"path": path, "name": path.rsplit("/", 1)[-1], "seed": seed, "group": "g", "rows": rows,
            "samples": samples, "trainable": None, "curves": {}}  # fmt: skip


def test_arms_are_one_run_per_seed_disjoint_and_globs_take_brackets_literally():
    from fff_lightning.compare import arms_of
    from fff_lightning.errors import ConfigError

    runs = [_run(f"logs/e/fff-lora-[32]-2-seed={s}", s) for s in (1, 2)] + [
        _run(f"logs/e/lora-r8-seed={s}", s) for s in (1, 2)
    ]
    arms = arms_of(runs, ["fff=fff-lora-[32]-2-*", "lora=lora-r8-*"])
    assert [len(v) for v in arms.values()] == [2, 2]
    with pytest.raises(ConfigError, match="is in two arms"):
        arms_of(runs, ["all=*", "lora=*lora-r8*"])
    with pytest.raises(ConfigError, match="two runs of seed 1"):
        arms_of(runs + [_run("logs/other/lora-r8-seed=1", 1)], ["a=*fff*", "b=*r8*"])
    same_names = [_run("logs/e1/x-seed=1", 1), _run("logs/e2/x-seed=1", 1)]
    with pytest.raises(ConfigError, match="name the arms with --compare"):
        arms_of(same_names, None)


def test_one_seed_pair_or_a_diverged_run_gives_no_verdict_and_json_has_no_nan(tmp_path):
    from fff_lightning.compare import comparison, write_comparison

    tokens = np.full(50, 10)
    one = {"d": {i: (10, 0.5 * 10) for i in range(50)}}
    lower = {"d": {i: (10, 0.4 * 10) for i in range(50)}}
    arms = {"a": [_run("a/r-seed=1", 1, samples=lower)], "b": [_run("b/r-seed=1", 1, samples=one)]}
    d, verdict = comparison(arms)["differences"]["d"]
    assert d.n == 1 and verdict.startswith("no verdict: one seed pair") and d.high < 0  # the interval is still shown
    assert tokens.sum() == 500
    nan = {
        "a": [_run("a/r-seed=1", 1, loss=float("nan")), _run("a/r-seed=2", 2)],
        "b": [_run("b/r-seed=1", 1), _run("b/r-seed=2", 2)],
    }
    result = comparison(nan)
    assert result["differences"]["d"][1].startswith("no verdict: a loss is not finite")
    write_comparison(tmp_path, nan, result, {}, "")
    assert "NaN" not in (tmp_path / "comparison.json").read_text()
    json.loads((tmp_path / "comparison.json").read_text())


def test_a_table_of_batch_means_is_not_mixed_with_token_weighted_differences():
    from fff_lightning.compare import comparison

    samples = {"d": {0: (10, 2.0), 1: (30, 3.0)}}  # token-weighted: 5 / 40 = 0.125
    runs = {n: [_run(f"{n}/r-seed={s}", s, loss=0.9, samples=samples) for s in (1, 2)] for n in ("a", "b")}
    for arm in runs.values():
        for r in arm:
            r["rows"][0]["reduction"] = "batches"
    result = comparison(runs)
    assert result["intervals"][("a", "d")].mean == pytest.approx(0.125)
    assert any("batch means" in n for n in result["notes"])


def test_a_run_the_sweep_recorded_as_failed_is_left_out_even_with_a_table(tmp_path, capsys):
    from fff_lightning.report import pick_runs

    for name in ("ok-seed=1", "bad-seed=1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "validation.json").write_text("[]")
    (tmp_path / "sweep.json").write_text(
        json.dumps({"bad-seed=1": {"state": "failed"}, "ok-seed=1": {"state": "done"}})
    )
    assert pick_runs(sorted(tmp_path.iterdir())) == [tmp_path / "ok-seed=1"]
    assert "bad-seed=1 (failed in the sweep)" in capsys.readouterr().err


def test_a_grid_refuses_seeds_set_by_hand_beside_seeds_and_gives_each_arm_its_baseline(tmp_path):
    from fff_lightning.errors import ConfigError
    from fff_lightning.sweep import expand, load_grid

    path = tmp_path / "grid.yaml"
    for bad, field in (
        ({"grid": {"model.seed": [1, 2]}}, "sweep.grid.model.seed"),
        ({"set": {"model.seed": 3}}, "sweep.set.model.seed"),
        ({"arms": {"a": {"set": {"model.seed": 3}}}}, "sweep.arms.a.set.model.seed"),
    ):
        path.write_text(yaml.safe_dump({"sweep": {"experiment": "x", "configs": ["tiny"], "seeds": [1], **bad}}))
        with pytest.raises(ConfigError) as e:
            load_grid(path)
        assert e.value.field == field
    arms = {"hi": {"set": {"model.lr": 0.01}}, "lo": {"set": {"model.lr": 0.0001}}}
    grid = {"experiment": "x", "configs": ["tiny"], "seeds": [1], "arms": arms, "baselines": "lora_rank"}
    path.write_text(yaml.safe_dump({"sweep": grid}))
    runs = expand(load_grid(path))
    baselines = {r.name: r for r in runs if r.baseline_of}
    assert sorted(baselines) == ["hi-lora-r14-seed=1", "lo-lora-r14-seed=1"]
    assert "--model.lr=0.0001" in baselines["lo-lora-r14-seed=1"].overrides


def test_per_sample_losses_are_the_same_in_slices_of_positions(trained_run, monkeypatch):
    """A large vocabulary is scored a slice of positions at a time: the sums do not depend on the slice."""
    import torch

    from fff_lightning import module as module_file

    module = trained_run.module
    ids = torch.randint(3, 1000, (2, 40))
    labels = ids.clone()
    labels[1, 30:] = -100  # a shorter row, padded
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}
    with torch.no_grad():
        whole = module.sample_losses(batch)
        monkeypatch.setattr(module_file, "SAMPLE_LOSS_CHUNK", 7 * 32000)  # 7 positions a slice
        sliced = module.sample_losses(batch)
    assert torch.equal(whole[1], sliced[1]) and whole[1].tolist() == [39, 29]
    assert torch.allclose(whole[0], sliced[0], rtol=1e-6)


def test_task_verdicts_follow_the_metrics_direction():
    """An accuracy higher in one arm is "<arm> higher"; bits per byte lower is "<arm> lower"; paired over items."""
    from fff_lightning import compare

    def run(seed, acc, bpb):
        items = {"acc": {str(i): [float(v), 1.0] for i, v in enumerate(acc)},
                 "bits_per_byte": {str(i): [b * 100, 100.0] for i, b in enumerate(bpb)}}  # fmt: skip
        metrics = {"acc": float(np.mean(acc)), "bits_per_byte": float(np.mean(bpb))}
        task = {"metrics": metrics, "higher_is_better": {"acc": True, "bits_per_byte": False}, "items": items}
        return {"seed": seed, "name": f"r{seed}", "tasks": {"t": task}}

    rng = np.random.default_rng(0)
    good = [run(s, rng.random(40) < 0.8, 1 + rng.random(40) * 0.1) for s in (1, 2, 3)]
    bad = [run(s, rng.random(40) < 0.2, 2 + rng.random(40) * 0.1) for s in (1, 2, 3)]
    result = compare.task_comparison({"good": good, "bad": bad})
    verdicts = {k: v for k, (_, v) in result["differences"].items()}
    assert verdicts == {"t: acc": "good higher", "t: bits_per_byte": "good lower"}
    flipped = compare.task_comparison({"bad": bad, "good": good})
    assert {k: v for k, (_, v) in flipped["differences"].items()} == verdicts
