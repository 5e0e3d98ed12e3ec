"""What a new user (or a security reviewer) meets: files written only where and as the tool chose, an environment
that does not decide silently, inputs that cost little before they are checked, and one line for each mistake."""

import os

import pytest
import yaml
from helpers import QUICK, quick_args

from fff_lightning.cli import main
from fff_lightning.errors import ConfigError


def one_line(capsys, *argv) -> str:
    """The one line a failing command prints (no traceback), with its exit status 1 or 2."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code in (1, 2), e.value.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


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


def test_a_stray_rank_in_the_environment_of_a_one_process_run_is_ignored_and_said(tmp_path, monkeypatch, capsys):
    """``RANK=1`` (left by a scheduler or a launcher's shell) made a one-process fit skip its lock and folder claim
    and overwrite an existing run; now it is ignored, with a note, and the run takes a folder of its own."""
    from fff_lightning.lightning_cli import run_lightning

    first = run_lightning(quick_args(tmp_path, "--trainer.limit_val_batches", "0", steps=1))
    before = (first.folder.path / "adapter" / "adapter_model.safetensors").read_bytes() if (
        first.folder.path / "adapter" / "adapter_model.safetensors").exists() else None  # fmt: skip
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")
    second = run_lightning(quick_args(tmp_path, "--trainer.limit_val_batches", "0", steps=1))
    assert "RANK=1 in the environment is ignored: this run has one process" in capsys.readouterr().err
    assert second.folder.path != first.folder.path and second.folder.path.name.endswith("-1")
    assert "RANK" not in os.environ
    if before is not None:
        assert (first.folder.path / "adapter" / "adapter_model.safetensors").read_bytes() == before
    from fff_lightning.distributed import configured_processes

    assert configured_processes({"devices": 2, "num_nodes": 2, "accelerator": "cpu"}) == 4
    assert configured_processes({"devices": "0,1", "accelerator": "gpu"}) == 2
    assert configured_processes({"devices": "auto", "accelerator": "cpu"}) == 1
