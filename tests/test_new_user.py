"""What a new user (or a security reviewer) meets: files written only where and as the tool chose, an environment
that does not decide silently, inputs that cost little before they are checked, and one line for each mistake."""

import os

import pytest
import yaml
from helpers import QUICK, quick_args, refused

from fff_lightning.cli import main
from fff_lightning.errors import ConfigError


def one_line(capsys, *argv) -> str:
    """The one line a failing command prints (no traceback), with its exit status 1 or 2."""
    line = refused(argv, capsys, one_error=True)
    assert line.startswith("error"), line
    return line


# -- 1. files the tool writes go where it chose, never through a link ------------------------------------------


def test_a_lock_file_that_is_a_link_is_refused_and_what_it_points_to_is_untouched(tmp_path):
    from fff_lightning import runs

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    run = tmp_path / "logs" / "tiny" / "run"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(precious)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        runs.lock_folder(run)
    assert precious.read_text() == "keep me\n"
    (run / ".lock").unlink()
    (run / ".lock").mkdir()  # not a file either
    with pytest.raises(ConfigError, match="not a plain file"):
        runs.lock_folder(run)


def test_a_sweeps_lock_link_and_an_experiment_outside_logs_are_refused(tmp_path):
    from fff_lightning import sweep

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    grid = {"sweep": {"experiment": "e", "configs": [QUICK], "seeds": [1], "logs_dir": str(tmp_path / "logs")}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    g = sweep.load_grid(path)
    (tmp_path / "logs" / "e").mkdir(parents=True)
    (tmp_path / "logs" / "e" / ".sweep.lock").symlink_to(precious)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        sweep.lock_experiment(g)
    assert precious.read_text() == "keep me\n"
    for bad in ("../outside", "a/b", ".hidden"):
        grid["sweep"]["experiment"] = bad
        path.write_text(yaml.safe_dump(grid))
        with pytest.raises(ConfigError, match="sweep.experiment.*cannot be a folder name"):
            sweep.load_grid(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml", "logs", "precious.txt"]


def test_a_run_name_from_the_environment_is_checked_like_any_other(tmp_path):
    from fff_lightning import runs
    from fff_lightning.spec import AdapterSpec, LoRAConfig

    spec = AdapterSpec(lora=LoRAConfig())
    with pytest.raises(ConfigError, match="FFF_RUN_NAME.*cannot be a folder name"):
        runs.RunFolder.open("fit", logs_dir=str(tmp_path), experiment="e", run_name=None, adapters=spec,
                            first_process=False, shared_name="../../outside")  # fmt: skip
    assert not (tmp_path.parent / "outside").exists()


def test_a_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    name = "实验" * 50  # 100 characters, 300 bytes in UTF-8
    line = one_line(capsys, *quick_args(tmp_path, "--run_name", name, steps=1))
    assert "300 bytes in UTF-8" in line and "at most 200" in line
    assert not (tmp_path / "tiny").exists()


# -- 2. the environment does not decide silently -----------------------------------------------------------------


def test_a_stray_rank_in_the_environment_of_a_one_process_run_is_ignored_and_said(tmp_path, monkeypatch, capsys,
                                                                                   trained_run):  # fmt: skip
    """``RANK=1`` (left by a scheduler or a launcher's shell) made a one-process fit skip its lock and folder claim
    and overwrite an existing run; now it is ignored, with a note, and the run takes a folder of its own."""
    import shutil

    from fff_lightning.lightning_cli import run_lightning

    first = tmp_path / "tiny" / trained_run.run.name  # an existing run, which a one-process fit must not touch
    shutil.copytree(trained_run.run, first)
    before = _tree(first)
    monkeypatch.setenv("RANK", "1")
    second = run_lightning(quick_args(tmp_path, "--trainer.limit_val_batches", "0", steps=1))
    assert "RANK=1 in the environment is ignored: this run has one process" in capsys.readouterr().err
    assert second.folder.path != first and second.folder.path.name.endswith("-1")
    assert "RANK" not in os.environ and _tree(first) == before
    from fff_lightning.distributed import configured_processes

    assert configured_processes({"devices": 2, "num_nodes": 2, "accelerator": "cpu"}) == 4
    assert configured_processes({"devices": "0,1", "accelerator": "gpu"}) == 2
    assert configured_processes({"devices": "auto", "accelerator": "cpu"}) == 1


# -- 3. a resume checks what it resumes --------------------------------------------------------------------------


def _copy_run(trained_run, tmp_path):
    import shutil

    logs = tmp_path / "logs"
    run = logs / "tiny" / trained_run.run.name
    shutil.copytree(trained_run.run, run)
    return logs, run, run / "checkpoints" / trained_run.ckpt.name


def _tree(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def test_a_resume_with_another_schedule_or_base_model_is_refused_before_anything_is_touched(
    trained_run, tmp_path, capsys
):
    import torch

    from fff_lightning.lightning_cli import run_lightning

    logs, run, ckpt = _copy_run(trained_run, tmp_path)
    before = _tree(logs)
    resume = ["--ckpt_path", str(ckpt), "--run_name", run.name, "--trainer.limit_val_batches", "0"]
    # another trainer.max_steps: the learning-rate schedule would be rebuilt on another total
    with pytest.raises(ConfigError, match=r"trainer.max_steps: is 4; the checkpoint's run had 2"):
        run_lightning(quick_args(logs, *resume, steps=4))
    # another base model shape (the tiny model's width): refused before the run's config.yaml or events change
    with pytest.raises(ConfigError, match="trained on another base model: its hidden_size is 64, this run's 32"):
        run_lightning(quick_args(logs, *resume, "--model.base.tiny.hidden_size", "32", steps=2))
    # the same shape, another name (a checkpoint edited to say so): refused, or allowed with a note
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state["fff_run"]["base"]["name"] = "someone/other-model"
    other = tmp_path / "other.ckpt"
    torch.save(state, other)
    before_other = _tree(logs)
    other_resume = ["--ckpt_path", str(other), "--run_name", run.name, "--trainer.limit_val_batches", "0"]
    with pytest.raises(ConfigError, match="trained on someone/other-model, this run's base model is tiny"):
        run_lightning(quick_args(logs, *other_resume, steps=2))
    assert _tree(logs) == before_other == before  # nothing written: no config.yaml, no events file
    # --resume_changes allow lets a moved base model and a longer schedule through, and says so
    from fff_lightning.module import check_checkpoint_run
    from fff_lightning.plan import plan_run
    from fff_lightning.run_config import describe_run

    module = describe_run(QUICK).model
    plan = plan_run(module.base, module.adapters)
    schedule = state["fff_run"]["schedule"]
    note = check_checkpoint_run(state, plan, {**schedule, "max_steps": 3}, allow_changes=True)
    assert note == ("base model someone/other-model -> tiny; trainer.max_steps 2 -> 3 (the learning-rate schedule "
                    "is rebuilt on the new total)")  # fmt: skip
    with pytest.raises(ConfigError, match="its hidden_size is 64"):  # another shape: never
        other_plan = plan_run(describe_run(QUICK, overrides=["--model.base.tiny.hidden_size", "32"]).model.base,
                              module.adapters)  # fmt: skip
        check_checkpoint_run(state, other_plan, schedule, allow_changes=True)


# -- 4. inputs that cost without bound or ended in tracebacks -----------------------------------------------------


def test_weights_in_a_pickle_that_holds_code_are_one_line_and_never_run(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from test_families import tiny_model

    folder = tiny_model(tmp_path / "model", "mistral")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("THE PICKLE RAN",))

    torch.save({**weights, "payload": Payload()}, folder / "pytorch_model.bin")
    capsys.readouterr()
    line = one_line(capsys, "generate", str(folder), "--prompt", "hi")
    assert "holds Python objects, not only tensors, and is not loaded" in line and "it calls print" in line
    line = one_line(capsys, *quick_args(tmp_path / "logs", "--model.base.backend", "hf", "--model.base.name_or_path",
                                        str(folder), "--model.base.load_in_4bit", "false", steps=1))  # fmt: skip
    assert "holds Python objects" in line
    assert "THE PICKLE RAN" not in capsys.readouterr().out


def test_a_disk_full_at_the_start_is_one_line_before_anything_is_logged(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    line = one_line(capsys, *quick_args(tmp_path, steps=1))
    assert "only 0 MiB free" in line and "a checkpoint needs about" in line
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_report_on_a_table_holding_a_huge_number_is_one_line(tmp_path, capsys):
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "validation.json").write_text(json.dumps([{"dataset": "math", "loss": 1.0, "tokens": 10**400}]))
    line = one_line(capsys, "report", str(run), "--out", str(tmp_path / "report"))
    assert "'tokens' = 1000000" in line and "401 digits" in line
    assert not (tmp_path / "report").exists()


def test_an_offline_download_dry_run_lists_each_repository_once_with_its_splits(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SystemExit):
        main(["download", "--config", "step2", "--dry-run"])
    got = capsys.readouterr()
    out, line = got.out, got.err.strip().splitlines()[-1]
    missing = [x for x in out.splitlines() if "missing:" in x]
    assert sum("HuggingFaceH4/ultrachat_200k" in x for x in missing) == 1, missing
    assert "ultrachat_200k (splits train_sft, test_sft)" in out
    assert line.endswith(f"{len(missing)} of the repositories and splits an offline run needs are not in the hub cache")


def test_a_crash_during_training_keeps_the_run_folder_with_its_logs(tmp_path):
    """A failure the tool does not know (a bug, a device error), after training started and before any checkpoint:
    the run folder stays, with its config and TensorBoard events (before, it was removed as unused)."""
    fail = ["--trainer.callbacks+=faults.FailAtStep", "--trainer.callbacks.step=2", "--trainer.limit_val_batches=0"]
    with pytest.raises(RuntimeError, match="planted failure at step 2"):
        main(quick_args(tmp_path, *fail, steps=4))
    (run,) = (tmp_path / "tiny").iterdir()
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents*"))
