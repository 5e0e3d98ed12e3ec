"""Faults a long run meets, tried as they happen: divergence, signals, kill -9, two runs at once, resumes that do
not match, bad and damaged files, a full disk. docs/reliability.md lists them with these tests."""

import errno
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICK, adapter_weights, losses, quick_args, run_cli, start_cli

from fff_lightning.cli import main
from fff_lightning.errors import ConfigError, Diverged
from fff_lightning.lightning_cli import run_lightning


def args(logs, *extra, steps=8, command="fit"):
    return quick_args(logs, "--trainer.limit_val_batches", "1", *extra, steps=steps, command=command)


def every(n):
    return [
        "--trainer.callbacks+=ModelCheckpoint",
        f"--trainer.callbacks.every_n_train_steps={n}",
        "--trainer.callbacks.save_top_k=-1",
    ]


def fault(name, **kw):
    return [f"--trainer.callbacks+={json.dumps({'class_path': f'faults.{name}', 'init_args': kw})}"]


def subprocess_fit(logs, *extra, steps=8):
    return run_cli(args(logs, *extra, steps=steps))


def run_dir(logs) -> Path:
    (run,) = [p for p in (Path(logs) / "tiny").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An 8-step run, the reference every interrupted and resumed run must equal."""
    logs = tmp_path_factory.mktemp("reference")
    cli = run_lightning(args(logs))
    run = Path(cli.trainer.log_dir)
    return losses(run), adapter_weights(run / "adapter")


# -- numerics ----------------------------------------------------------------------------------------------------
def test_a_nan_at_a_chosen_step_stops_the_run_there_and_saves_nothing_after(tmp_path):
    with pytest.raises(Diverged, match="step 5: the training loss or a gradient is not finite"):
        run_lightning(args(tmp_path, *every(2), *fault("NaNAtStep", step=5)))
    run = run_dir(tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    last = torch.load(run / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())  # the last good one, kept
    assert not (run / "adapter").exists() and not (run / "validation.json").exists()


def test_skip_mode_drops_the_bad_step_counts_it_and_finishes(tmp_path):
    cli = run_lightning(args(tmp_path, "--model.on_nonfinite", "skip", *fault("NaNAtStep", step=3, transient=True)))
    assert cli.model.skipped_steps == 1
    weights = adapter_weights(Path(cli.trainer.log_dir) / "adapter")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_a_validation_loss_that_is_not_finite_is_shown_not_dropped(tmp_path, capsys):
    from safetensors.torch import save_file

    cli = run_lightning(args(tmp_path / "logs", steps=2))
    adapter = Path(cli.trainer.log_dir) / "adapter"
    weights = adapter_weights(adapter)
    name = next(k for k in weights if "fff_blocks" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(adapter / "adapter_model.safetensors"))  # a diverged export, made by hand
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            ["validate", "--config", QUICK, "--model.adapter_path", str(adapter), "--trainer.enable_progress_bar=false"]
        )
    assert e.value.code == 3
    out = capsys.readouterr()
    assert "NOT FINITE" in out.out and "not finite" in out.err
    rows = json.loads((adapter.parent / "validation.json").read_text())
    assert all(r["finite"] is False and r["loss"] != r["loss"] for r in rows)  # NaN, never a good-looking 0.0


def test_adapters_holding_nan_are_never_exported(tiny, tmp_path):
    from fff_lightning.adapters import NonFiniteAdapters, save_adapters
    from fff_lightning.loading import build_model
    from fff_lightning.spec import FFFConfig

    fff = FFFConfig(n_sublayers=1, width=8)
    model, _, _ = build_model(tiny, fff)
    save_adapters(model, tmp_path / "a", fff)
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "fff_blocks" in n).fill_(float("inf"))
    with pytest.raises(NonFiniteAdapters):
        save_adapters(model, tmp_path / "a", fff)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before


# -- interruptions -----------------------------------------------------------------------------------------------
def resume_command(stderr: str) -> list[str]:
    """The command the interrupted run printed, to run as a user pastes it (``python`` = this interpreter)."""
    import shlex

    line = stderr.strip().splitlines()[-1]
    cmd = shlex.split(line.split("Resume with: ", 1)[1])
    assert cmd[:3] == ["python", "-m", "fff_lightning"], cmd
    return [sys.executable, *cmd[1:]]


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_the_adapters_and_the_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    # Interrupted at step 3 (SIGINT), resumed with the printed command, interrupted again at step 6 (SIGTERM), resumed
    # again with the new printed command: the same as never interrupted.
    twice = [*fault("SignalAtStep", step=3, signum="SIGINT"), *fault("SignalAtStep", step=6, signum="SIGTERM")]
    out = subprocess_fit(tmp_path, *twice)
    assert out.returncode == 130, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted by SIGINT at step 3; saved checkpoint") and "Resume with: python -m" in line
    run = run_dir(tmp_path)
    assert (run / "checkpoints" / "interrupted-step=3.ckpt").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    again = run_cli(resume_command(out.stderr)[3:])
    assert again.returncode == 143, again.stderr[-2000:]
    second = resume_command(again.stderr)
    ckpt_args = [a for a in second if a.startswith("--ckpt_path")]
    assert ckpt_args == ["--ckpt_path"] and second[second.index("--ckpt_path") + 1].endswith("interrupted-step=6.ckpt")
    assert second.count("--run_name") == 1
    resumed = run_lightning(second[3:])  # in this process: the same command line, without the interpreter
    ref_losses, ref_weights = uninterrupted
    got = losses(Path(resumed.trainer.log_dir))
    assert {5, 6, 7} <= set(got) and all(got[s] == ref_losses[s] for s in got)  # what three processes logged
    weights = adapter_weights(run / "adapter")
    assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights)


def test_a_signal_before_training_stops_at_once_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    import fff_lightning.data.datamodule as dm

    for extra, code, when in (
        (fault("SignalAtHook", hook="on_sanity_check_start", signum="SIGINT"), 130, "sanity check"),
        ([], 143, "tokenization"),
    ):
        if not extra:  # a real SIGTERM while the data is being prepared
            original = dm.prepare_source

            def prepare(*a, original=original, **k):
                os.kill(os.getpid(), signal.SIGTERM)
                return original(*a, **k)

            monkeypatch.setattr(dm, "prepare_source", prepare)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(args(tmp_path / "logs", "--trainer.num_sanity_val_steps", "1", *extra, steps=2))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code, (when, err)
        assert "before training started: nothing was trained" in err[-1] and "Traceback" not in "\n".join(err), when
        assert not (tmp_path / "logs").exists(), when  # no run folder (the next is not "-1"), no empty folders
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back after the command


@pytest.mark.slow
def test_a_signal_at_the_last_step_or_after_lets_the_run_finish(tmp_path, capsys):
    for extra, says in (
        (fault("SignalAtStep", step=3, signum="SIGINT"), "this is the last training step"),
        (fault("SignalAtHook", hook="on_validation_start", signum="SIGTERM", after_step=3), "training has finished"),
    ):
        logs = tmp_path / says.split()[-1]
        capsys.readouterr()
        main(args(logs, "--trainer.val_check_interval", "3", *extra, steps=3))  # returns: the run ends normally
        err = capsys.readouterr().err
        assert says in err and "saving a checkpoint" not in err, err[-2000:]
        run = run_dir(logs)
        assert (run / "adapter").is_dir() and (run / "validation.json").is_file()
        assert not list(run.rglob("interrupted-*"))


@pytest.mark.slow
def test_sigterm_saves_and_stops_with_143(tmp_path):
    out = subprocess_fit(tmp_path, *fault("SignalAtStep", step=3, signum="SIGTERM"), steps=6)
    assert out.returncode == 143, out.stderr[-2000:]
    assert (run_dir(tmp_path) / "checkpoints" / "interrupted-step=3.ckpt").is_file()


@pytest.mark.slow
def test_kill_9_loses_only_the_work_since_the_last_checkpoint(tmp_path, uninterrupted):
    out = subprocess_fit(tmp_path, *every(2), *fault("SignalAtStep", step=6, signum="SIGKILL"))
    assert out.returncode == -signal.SIGKILL
    run = run_dir(tmp_path)
    ckpt = run / "checkpoints" / "epoch=0-step=4.ckpt"
    assert ckpt.is_file() and not list(run.rglob(".*.tmp*"))  # whole checkpoints, no half-written file
    run_lightning(args(tmp_path, "--run_name", run.name, "--ckpt_path", str(ckpt)))
    weights = adapter_weights(run / "adapter")
    assert all(torch.equal(weights[k], uninterrupted[1][k]) for k in weights)


# -- resuming and run folders ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_resume_with_other_adapters_or_data_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import fff_lightning.backends.hf as hf_backend

    cli = run_lightning(args(tmp_path, *every(2), steps=2))
    ckpt = next(Path(cli.trainer.log_dir, "checkpoints").glob("*.ckpt"))
    monkeypatch.setattr(hf_backend, "load_pretrained", lambda *a, **k: pytest.fail("loaded weights before refusing"))
    for change, says in (
        (["--model.fff.width", "16"], "other adapters"),
        (["--data.batch_size", "4"], "data.batch_size"),
    ):
        with pytest.raises(ConfigError, match=says):
            run_lightning(args(tmp_path, "--ckpt_path", str(ckpt), *change, steps=2))
    monkeypatch.undo()
    # Same shapes, another setting, and the user says so: it resumes.
    run_lightning(
        args(tmp_path, "--ckpt_path", str(ckpt), "--model.fff.init", "normal", "--resume_changes", "allow", steps=3)
    )


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_folder(tmp_path):
    cmd = args(tmp_path, steps=2)
    named = [*cmd, "--run_name", "same"]
    procs = [start_cli(c) for c in (cmd, cmd, named, named)]  # four processes at once
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes[:2] == [0, 0], outs[0][1][-1500:]
    folders = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert folders == ["lora-[32]-2-[gelu_new]-[up_proj]", "lora-[32]-2-[gelu_new]-[up_proj]-1", "same"]
    assert sorted(codes[2:]) == [0, 2]  # the same --run_name: one runs, the other is refused in one line
    refused = outs[2][1] if codes[2] else outs[3][1]
    assert "same exists" in refused.strip().splitlines()[-1]


def test_a_run_without_a_logger_still_writes_into_its_own_folder(tmp_path, monkeypatch):
    # Lightning's root would be the working directory: two such runs would overwrite each other's files there.
    monkeypatch.chdir(tmp_path)
    main(args(tmp_path / "logs", "--trainer.logger", "false", "--trainer.limit_val_batches", "0", steps=2))
    (run,) = (tmp_path / "logs" / "tiny").iterdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]
    assert {"adapter", "checkpoints", "config.yaml"} <= {p.name for p in run.iterdir()}


@pytest.mark.slow
def test_a_fit_stopped_after_its_last_validation_says_the_table_is_of_earlier_adapters(tmp_path, capsys):
    main(args(tmp_path, "--trainer.val_check_interval", "4", steps=6))
    out = capsys.readouterr().out
    assert "last validation (step 4 of 6)" in out and "validation after training" not in out
    assert "the table is of the adapters at step 4, not the final ones" in out
    main(args(tmp_path, "--trainer.val_check_interval", "4", steps=3))
    out = capsys.readouterr().out
    assert "no validation ran in this fit (it stopped at step 3, before the first)" in out
    assert "--model.adapter_path" in out


def test_a_run_that_fails_on_its_input_leaves_no_folder_behind(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path / "logs", "--data.paths", f"{{metamath: {empty}}}"))
    assert e.value.code == 2 and "is empty" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()  # no run folder (the next is not "-1"), no empty folders


def test_validate_and_predict_refuse_untrained_adapters(capsys):
    for command in ("validate", "predict"):
        with pytest.raises(SystemExit) as e:
            main([command, "--config", QUICK])
        assert e.value.code == 2 and "needs trained adapters" in capsys.readouterr().err


def test_predictions_never_overwrite_an_earlier_file(tmp_path):
    from fff_lightning.runs import write_predictions

    first = write_predictions(tmp_path, [{"prompt": "a", "answer": "b"}])
    second = write_predictions(tmp_path, [{"prompt": "c", "answer": "d"}])
    assert (first.name, second.name) == ("predictions.jsonl", "predictions-1.jsonl") and "b" in first.read_text()


# -- bad and damaged input: one line, exit 2 ---------------------------------------------------------------------
def _bad_inputs(tmp_path):
    good = run_lightning(args(tmp_path / "good", *every(2), steps=2))
    run = Path(good.trainer.log_dir)
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    truncated_ckpt = tmp_path / "truncated.ckpt"
    truncated_ckpt.write_bytes(ckpt.read_bytes()[:5000])
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(run / "adapter", bad_weights)
    data = (bad_weights / "adapter_model.safetensors").read_bytes()
    (bad_weights / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = tmp_path / "bad_json"
    shutil.copytree(run / "adapter", bad_json)
    (bad_json / "fff_adapter_config.json").write_text('{"fff": {"n_sublayers": 2,')
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"query": "q", "response": "r"}\n{"query": "caf\xe9", "response": "r"}\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first prompt\nsecond \xff prompt\n")
    bad_row = tmp_path / "bad_row.jsonl"
    rows = [{"query": f"q{i}", "response": "r"} for i in range(40)]
    rows[2]["query"] = None  # line 3
    bad_row.write_text("".join(json.dumps(r) + "\n" for r in rows))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fit = args(tmp_path / "logs", steps=2)
    adapter = ["--model.adapter_path", str(run / "adapter")]
    return {
        "data file not UTF-8": (fit + ["--data.paths", f"{{metamath: {latin}}}"], f"{latin}, line 2: not UTF-8"),
        "empty data file": None,  # test_a_run_that_fails_on_its_input_leaves_no_folder_behind
        "bad row": (fit + ["--data.paths", f"{{metamath: {bad_row}}}"], f"{bad_row}, line 3: column 'query'"),
        "predict file not UTF-8": (
            ["predict", "--config", QUICK, *adapter, "--data.predict_file", str(prompts)],
            f"{prompts}, line 2: not UTF-8",
        ),
        "missing checkpoint": (fit + ["--ckpt_path", str(tmp_path / "nope.ckpt")], "no such checkpoint"),
        "truncated checkpoint": (fit + ["--ckpt_path", str(truncated_ckpt)], "is truncated or not a checkpoint"),
        "truncated adapter weights": (
            ["validate", "--config", QUICK, "--model.adapter_path", str(bad_weights)],
            "adapter_model.safetensors is truncated or corrupt",
        ),
        "corrupt adapter JSON": (
            ["validate", "--config", QUICK, "--model.adapter_path", str(bad_json)],
            "fff_adapter_config.json is corrupt",
        ),
        "unwritable logs folder": (args(blocker / "logs", steps=2), "cannot write to"),
        "GPU asked on a CPU machine": (fit + ["--trainer.accelerator", "gpu"], "error: trainer.accelerator:"),
        "unreachable hub id": (
            fit + ["--model.base.tokenizer", "nobody-here/no-such-tokenizer"],
            "cannot load the tokenizer",
        ),
    }


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the GPU case needs a machine without one")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for case, spec in _bad_inputs(tmp_path).items():
        if spec is None:
            continue
        argv, message = spec
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (case, err)
        assert err and message in err[-1] and err[-1].startswith("error:"), (case, err)
        assert "Traceback" not in "\n".join(err), case


def test_a_damaged_cache_entry_is_reported_and_rebuilt(tmp_path, caplog):
    from fff_lightning.data import prepare
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.data.sources import SourceConfig

    def module():
        src = [SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=8, val_rows=4)]
        return FFFDataModule(src, max_seq_length=64, cache_dir=str(tmp_path / "cache"))

    first = module()
    first.setup("fit")
    assert first.summary[0]["cached"] is False  # built by this run, and the summary says so
    expected = first.train_set[0]["input_ids"]
    arrow = next((tmp_path / "cache").rglob("*.arrow"))
    damaged = arrow.with_name("damaged")
    damaged.write_bytes(arrow.read_bytes()[:100])
    os.replace(damaged, arrow)  # a new file (the first module keeps its memory map of the old one)
    prepare.BUILT.clear()  # as in a new process
    second = module()
    with caplog.at_level("WARNING"):
        second.setup("fit")
    assert "is damaged" in caplog.text and "rebuilding" in caplog.text
    assert second.train_set[0]["input_ids"] == expected


def test_killed_writes_leave_no_temporary_folders_and_moving_the_cache_keeps_it(tmp_path, monkeypatch):
    from fff_lightning.data import prepare
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.data.sources import SourceConfig
    from fff_lightning.files import write_atomically

    (tmp_path / "c").mkdir()
    stale = tmp_path / "c" / ".entry.tmp999999999.abcd"  # a writer that no longer runs (pid beyond any real one)
    stale.mkdir()
    write_atomically(tmp_path / "c" / "entry", lambda d: (d / "x").write_text("1"))
    assert not stale.exists() and (tmp_path / "c" / "entry" / "x").is_file()

    monkeypatch.setenv("FFF_CACHE", str(tmp_path / "a"))
    src = [SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=8, val_rows=4)]
    FFFDataModule(src, max_seq_length=64).setup("fit")
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.setenv("FFF_CACHE", str(tmp_path / "b"))
    prepare.BUILT.clear()
    moved = FFFDataModule(src, max_seq_length=64)
    moved.setup("fit")
    assert moved.summary[0]["cached"] is True  # same entries, found at the new place


# -- resources ---------------------------------------------------------------------------------------------------
def test_out_of_gpu_memory_gives_advice_not_a_trace(tmp_path, capsys, monkeypatch):
    from fff_lightning.module import FFFModule

    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FFFModule, "training_step", oom)
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path, steps=2))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err[-1].startswith("error: out of GPU memory") and "data.batch_size" in err[-1]


def test_a_full_disk_keeps_the_earlier_files(tmp_path, tiny, monkeypatch):
    from fff_lightning.adapters import save_adapters
    from fff_lightning.files import DiskFullError, write_text
    from fff_lightning.loading import build_model
    from fff_lightning.spec import FFFConfig

    table = write_text(tmp_path / "validation.json", "earlier")
    with pytest.raises(DiskFullError, match="the earlier file is intact"), open(os.devnull) as _:
        from fff_lightning.files import atomic_file

        with atomic_file(table) as fh:
            fh.write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert table.read_text() == "earlier" and not list(tmp_path.glob(".*tmp*"))

    fff = FFFConfig(n_sublayers=1, width=8)
    model, _, _ = build_model(tiny, fff)
    save_adapters(model, tmp_path / "adapter", fff)
    before = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)  # the weights file, written by Python
    with pytest.raises(DiskFullError):
        save_adapters(model, tmp_path / "adapter", fff)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == before
