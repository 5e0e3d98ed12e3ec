"""``evaluate``: lm-evaluation-harness on a run's in-memory model, with the shipped offline tasks."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import QUICK

from fff_lightning.cli import main
from fff_lightning.evaluate import local_tasks, read_task_results


def evaluate(*args: str) -> None:
    main(["evaluate", *args])


def tree(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too), a file with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


@pytest.mark.slow
def test_a_shipped_task_scores_the_same_through_evaluate_and_through_lm_evals_own_entry_point(tmp_path):
    """The base model alone, from a model folder: ``evaluate`` (the model built as ``fit`` builds it, handed over in
    memory) and lm-eval's own command line (``lm_eval --model hf``, the same task as a YAML file) agree."""
    from lm_eval.__main__ import cli_evaluate
    from test_families import tiny_model

    folder = tiny_model(tmp_path / "model", "mistral")
    base = ["--model.base.backend", "hf", "--model.base.name_or_path", str(folder), "--model.base.load_in_4bit=false"]
    tasks = "fff_math_bpb,fff_math_greedy"
    evaluate("--config", QUICK, *base, "--tasks", tasks, "--limit", "5", "--batch_size", "4", "--out_dir",
             str(tmp_path / "ours"))  # fmt: skip
    ours = {t: json.loads((tmp_path / "ours" / f"{t}.json").read_text()) for t in tasks.split(",")}

    include = tmp_path / "tasks"
    include.mkdir()
    for name in tasks.split(","):
        (include / f"{name}.yaml").write_text(yaml.safe_dump(local_tasks()[name]))
    cli_evaluate_args = ["--model", "hf", "--model_args", f"pretrained={folder},dtype=float32,max_length=256",
                         "--tasks", tasks, "--include_path", str(include), "--limit", "5", "--batch_size", "4",
                         "--device", "cpu", "--output_path", str(tmp_path / "theirs")]  # fmt: skip
    import sys

    argv, sys.argv = sys.argv, ["lm_eval", *cli_evaluate_args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
    (results,) = (tmp_path / "theirs").rglob("results_*.json")
    theirs = json.loads(results.read_text())["results"]
    assert ours["fff_math_bpb"]["metrics"]["bits_per_byte"] == pytest.approx(
        theirs["fff_math_bpb"]["bits_per_byte,none"], rel=1e-6
    )
    assert ours["fff_math_greedy"]["metrics"]["acc"] == theirs["fff_math_greedy"]["acc,none"]
    assert ours["fff_math_bpb"]["items"] == 5 and ours["fff_math_bpb"]["adapter"] is None


@pytest.mark.slow
def test_adapters_change_the_score_and_each_task_has_its_results_and_items(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run.run, run)
    cfg = str(run / "config.yaml")
    evaluate("--config", cfg, "--model.adapter_path", str(run / "adapter"), "--tasks", "fff_math_bpb,fff_math",
             "--limit", "3", "--max_gen_toks", "8")  # fmt: skip
    out = capsys.readouterr().out
    assert "fff_math_bpb (3 items): bits_per_byte" in out and "generation: " in out and "tokens/s" in out
    got = read_task_results(run)
    assert set(got) == {"fff_math_bpb", "fff_math"}
    bpb = got["fff_math_bpb"]
    assert bpb["higher_is_better"] == {"bits_per_byte": False} and bpb["adapter"] == str((run / "adapter").resolve())
    items = bpb["items"]["bits_per_byte"]
    assert len(items) == 3 and all(den > 0 for _, den in items.values())
    assert sum(n for n, _ in items.values()) / sum(d for _, d in items.values()) == pytest.approx(
        bpb["metrics"]["bits_per_byte"], rel=1e-9
    )  # what report pairs is what lm-eval aggregated
    assert set(got["fff_math"]["items"]) == {"exact_match,last-number"}

    evaluate("--config", cfg, "--tasks", "fff_math_bpb", "--limit", "3", "--out_dir", str(tmp_path / "base"))
    base = json.loads((tmp_path / "base" / "fff_math_bpb.json").read_text())["metrics"]["bits_per_byte"]
    assert base != pytest.approx(bpb["metrics"]["bits_per_byte"], rel=1e-4)  # the trained adapters move it


@pytest.mark.slow
def test_a_bad_task_or_an_interrupted_or_failed_evaluation_leaves_the_run_as_it_was(trained_run, tmp_path, capsys,
                                                                                   monkeypatch):  # fmt: skip
    import shutil

    import lm_eval

    from fff_lightning import evaluate as ev

    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    before = tree(run)
    args = ["--config", str(run / "config.yaml"), "--model.adapter_path", str(run / "adapter"), "--limit", "2"]

    def fails(*argv) -> str:
        with pytest.raises(SystemExit) as e:
            evaluate(*argv)
        assert e.value.code in (2, 1, 130), e.value.code
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        return err[-1]

    # A misspelt task, and (offline, as the tests run) one of lm-eval's whose dataset is not in the cache
    assert "no task 'fff_mth'" in fails(*args, "--tasks", "fff_mth")
    line = fails(*args, "--tasks", "fff_math_bpb,gsm8k")
    assert "load_dataset('openai/gsm8k', 'main')" in line and "offline" in line
    # Ctrl-C while scoring
    real = lm_eval.simple_evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupted)
    assert fails(*args, "--tasks", "fff_math_bpb").startswith("interrupted by SIGINT while evaluating: nothing written")
    assert tree(run) == before
    # A disk that fills while the second task's results are written: the first task's files are whole, the
    # second's absent, no temporary file left
    monkeypatch.setattr(lm_eval, "simple_evaluate", real)
    written = ev.write_task
    calls = []

    def full(out, task, *a):
        calls.append(task)
        if len(calls) == 2:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return written(out, task, *a)

    monkeypatch.setattr(ev, "write_task", full)
    fails(*args, "--tasks", "fff_math_bpb,fff_math_greedy")
    after = tree(run)
    new = sorted(set(after) - set(before))
    assert {k: v for k, v in after.items() if k in before} == before
    assert new == ["eval", f"eval/{calls[0]}.json", f"eval/{calls[0]}.samples.jsonl"], new
