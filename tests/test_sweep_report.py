"""sweep and report as a user runs them: a 2 x 2 grid on the tiny model, a rerun, a failing run, the figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli

from fff_lightning.errors import ConfigError

ROOT = Path(__file__).parent.parent
GRID = """\
sweep:
  experiment: grid
  configs: [{quick}]
  set:
    trainer.max_steps: 4
    trainer.val_check_interval: 2
    trainer.log_every_n_steps: 1
    trainer.enable_progress_bar: false
    trainer.enable_model_summary: false
  grid:
    model.fff.width: [8, 16]
    model.fff.layers: ["1-2", "7"]   # the tiny model has 4 layers: the two runs on layer 7 fail
"""


def sweep(grid: Path, logs: Path):
    return run_cli(["sweep", "--config", str(grid), "--logs_dir", str(logs), "--quiet"], cwd=grid.parent, timeout=900)


@pytest.mark.slow
def test_a_2x2_sweep_runs_records_failures_skips_finished_runs_and_reports(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(quick=ROOT / "configs" / "tiny.yaml"))
    logs = tmp_path / "logs"
    first = sweep(grid, logs)
    assert first.returncode == 1, first.stdout + first.stderr  # two runs failed, and the sweep says so
    status = json.loads((logs / "grid" / "sweep.json").read_text())
    done = sorted(n for n, e in status.items() if e["state"] == "done")
    failed = sorted(n for n, e in status.items() if e["state"] == "failed")
    assert done == ["lora-[16]-2-[gelu_new]-[up_proj]-layers=1-2", "lora-[8]-2-[gelu_new]-[up_proj]-layers=1-2"]
    assert len(failed) == 2 and all("layer(s) [7] do not exist" in status[n]["error"] for n in failed)
    for name in done:  # each run went through fit and validate: TensorBoard events, adapter, table
        run = logs / "grid" / name
        assert list(run.glob("events.out.tfevents.*")) and (run / "adapter").is_dir()
        assert [r["dataset"] for r in json.loads((run / "validation.json").read_text())][0] == "magicoder"
    assert "run 4 of 4" in first.stdout and "left" in first.stdout

    again = sweep(grid, logs)
    assert "4 runs, 2 already finished, 2 to run" in again.stdout, again.stdout
    assert json.loads((logs / "grid" / "sweep.json").read_text())[done[0]]["seconds"] == status[done[0]]["seconds"]

    out = tmp_path / "report"
    runs = [str(logs / "grid" / n) for n in done]
    from fff_lightning.cli import main

    main(["report", *runs, "--out", str(out), "--reference", "research"])  # in this process: no exit, no error
    md = (out / "validation.md").read_text()
    assert "| dataset | " + " | ".join(done) + " | research LoRA (published) | research FFF (published) |" in md
    assert "| ultrachat | " in md and "1.0230 | 1.0490 |" in md
    for png in ("train_loss.png", "val_loss.png", "final_val_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "text, field",
    [
        ("nothing: 1\n", "sweep"),
        ("sweep:\n  experiment: x\n  configs: [c.yaml]\n", "sweep.grid"),
        ("sweep:\n  experiment: x\n  configs: [c.yaml]\n  grid: {model.lr: []}\n", "sweep.grid.model.lr"),
        ("sweep:\n  experiment: x\n  configs: [c.yaml]\n  grid: {model.lr: [1]}\n  grids: 1\n", "sweep.grids"),
        ("sweep:\n  experiment: x\n  configs: [missing.yaml]\n  grid: {model.lr: [1]}\n", "sweep.configs"),
    ],
)
def test_a_bad_grid_file_is_one_clear_error(tmp_path, text, field):
    from fff_lightning.sweep import load_grid

    (tmp_path / "c.yaml").write_text("model: {}\n")
    (tmp_path / "g.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_grid(tmp_path / "g.yaml")
    assert e.value.field == field


def test_report_refuses_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    from fff_lightning.cli import main

    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "half"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "has no validation.json" in capsys.readouterr().err


@pytest.mark.slow
def test_one_sweep_per_experiment_and_a_folder_in_use_is_never_renamed(tmp_path, capsys):
    from fff_lightning.cli import main
    from fff_lightning.runs import lock_folder
    from fff_lightning.sweep import Run, load_grid, lock_experiment, run_grid

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(GRID.format(quick=ROOT / "configs" / "tiny.yaml"))
    grid = load_grid(grid_file)
    grid.logs_dir = str(tmp_path / "logs")
    lock_experiment(grid)  # as a first sweep of the experiment would
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--config", str(grid_file), "--logs_dir", grid.logs_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "another sweep of 'grid' is running" in err[-1], err

    folder = tmp_path / "logs" / "grid" / "busy"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fff_lightning.runs import lock_folder; lock_folder({str(folder)!r}); "
         "print('locked', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = run_grid(grid, [Run("busy", ["--model.lr=1"])], quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert status["busy"]["state"] == "failed" and "in use by a run still running" in status["busy"]["error"]
    assert folder.is_dir() and not list(folder.parent.glob("busy.failed-*"))
    assert lock_folder(folder) is not None  # its holder is gone: the lock went with it


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _start_sweep(tmp_path: Path, *extra: str, steps: int = 500) -> tuple[subprocess.Popen, int]:
    """A sweep of one long run, its output to ``tmp_path/out.txt``; returns it and its run's process, once started."""
    import time

    text = GRID.format(quick=ROOT / "configs" / "tiny.yaml")
    text = text.replace("max_steps: 4", f"max_steps: {steps}\n    trainer.max_epochs: -1")
    grid = tmp_path / "grid.yaml"
    grid.write_text(text)
    # Not --quiet: the run writes to the sweep's own output (a file), not to a pipe that would break with it.
    cmd = [sys.executable, "-m", "fff_lightning", "sweep", "--config", str(grid), "--logs_dir", str(tmp_path), *extra]
    with open(tmp_path / "out.txt", "w") as out:
        sweep_proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    deadline, child = time.time() + 120, None
    while time.time() < deadline and child is None:
        kids = _children(sweep_proc.pid)
        child = kids[0] if kids else None
        time.sleep(0.2)
    assert child is not None, "the sweep started no run"
    return sweep_proc, child


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the run's process")
@pytest.mark.parametrize("start", ["forked", "fresh"])
def test_a_killed_sweep_takes_its_run_with_it(tmp_path, start):
    import os
    import signal
    import time

    from fff_lightning.sweep import can_fork

    if start == "forked" and not can_fork():
        pytest.skip("runs start as forks on Linux without an NVIDIA device only")
    sweep_proc, child = _start_sweep(tmp_path, *(["--fresh-processes"] if start == "fresh" else []))
    time.sleep(3)  # the run is under way (reading its config, its data or training)
    os.kill(sweep_proc.pid, signal.SIGKILL)
    sweep_proc.wait()
    deadline = time.time() + 180  # it saves at its next step boundary (after a validation under way): slow when busy
    while time.time() < deadline and _alive(child):
        time.sleep(0.2)
    alive = _alive(child)
    if alive:
        os.kill(child, signal.SIGKILL)
    assert not alive, "the run outlived its sweep"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the run's process")
def test_ctrl_c_to_a_sweep_reaches_its_run_which_saves_and_the_sweep_stops_with_130(tmp_path):
    """The run a sweep forked (the default on a CPU machine) takes a Ctrl-C as a run of its own does."""
    import signal
    import time

    sweep_proc, child = _start_sweep(tmp_path, steps=100_000)
    out = tmp_path / "out.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("grid/*/checkpoints/*.ckpt")):  # training is under way
        time.sleep(0.2)
    sweep_proc.send_signal(signal.SIGINT)
    assert sweep_proc.wait(timeout=120) == 130
    text = out.read_text()
    assert "sweep interrupted by SIGINT during fit of a run" in text, text[-2000:]
    assert "interrupted by SIGINT at step" in text and "--ckpt_path" in text, text[-2000:]  # the run's own lines
    assert not _alive(child)
    assert list(tmp_path.glob("grid/*/checkpoints/interrupted-step=*.ckpt"))


def test_a_run_counts_as_trained_once_validated_and_an_evaluation_never_retrains_it(tmp_path, monkeypatch):
    """The sweep's bookkeeping, with the commands faked: a run whose validate failed is trained again; one whose
    evaluation failed or was interrupted is only evaluated again."""
    from fff_lightning import sweep
    from fff_lightning.errors import Interrupted

    grid = sweep.Grid(experiment="x", configs=["tiny"], grid={}, logs_dir=str(tmp_path),
                      evaluate={"tasks": ["fff_math_bpb"]})  # fmt: skip
    run = sweep.Run(name="r", overrides=[])
    folder = tmp_path / "x" / "r"
    calls, outcome = [], {"fit": 0, "validate": 1, "evaluate": 0}

    def child(cmd, quiet, fork=False):
        sub = cmd[3]
        calls.append(sub)
        if outcome[sub] == "interrupt":
            raise Interrupted("interrupted by SIGINT", 2)
        if sub == "fit":
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "validation.json").write_text("[]")  # fit's last validation writes the table
        if sub == "evaluate" and outcome[sub] == 0:
            (folder / "eval").mkdir(exist_ok=True)
            (folder / "eval" / "fff_math_bpb.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, outcome[sub], "", "error: boom" if outcome[sub] else "")

    monkeypatch.setattr(sweep, "_run_child", child)
    monkeypatch.setattr(sweep, "_set_aside", lambda f: None)
    state = lambda: json.loads((tmp_path / "x" / "sweep.json").read_text())["r"]  # noqa: E731

    sweep.run_grid(grid, [run])  # validate fails: not trained
    assert calls == ["fit", "validate"] and state()["state"] == "failed" and not state()["trained"]
    calls.clear()
    outcome.update(validate=0, evaluate=1)
    sweep.run_grid(grid, [run])  # trained again; its evaluation fails
    assert calls == ["fit", "validate", "evaluate"] and state()["step"] == "evaluate" and state()["trained"]
    calls.clear()
    outcome.update(evaluate="interrupt")
    with pytest.raises(Interrupted):
        sweep.run_grid(grid, [run])  # only evaluated; interrupted
    assert calls == ["evaluate"] and state()["state"] == "trained"
    calls.clear()
    outcome.update(evaluate=0)
    sweep.run_grid(grid, [run])
    assert calls == ["evaluate"] and state()["state"] == "done"
    calls.clear()
    sweep.run_grid(grid, [run])
    assert calls == []  # finished: skipped
