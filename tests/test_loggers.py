"""Loggers of one's own beside the run folder, what TensorBoard shows and at which steps, and what a failed command
leaves behind (issue 30, items 6 and 7)."""

import contextlib
import csv
import io
import logging
import re
import shlex
import warnings
from pathlib import Path

import pytest
from helpers import QUICK, quick_args, scalars

from fff_lightning.cli import main
from fff_lightning.lightning_cli import run_lightning


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A 3-step run with a CSVLogger of its own, validated once at step 2; its output and folders."""
    tmp = tmp_path_factory.mktemp("csv")
    argv = quick_args(tmp / "logs", "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp / "csv"),
                      "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                      "--trainer.num_sanity_val_steps", "0", steps=3)  # fmt: skip
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(tmp)  # nothing may land in the working folder
        cli = run_lightning(argv)
    (run,) = (tmp / "logs" / "tiny").iterdir()
    return tmp, run, cli, printed.getvalue()


def test_a_logger_of_ones_own_logs_beside_the_run_folder_which_keeps_every_file(csv_run):
    tmp, run, cli, out = csv_run
    assert Path(cli.trainer.log_dir) == run  # Lightning's log_dir: where config.yaml and checkpoints go
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["TensorBoardLogger", "CSVLogger"]
    assert (run / "config.yaml").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "validation.json").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch=0-step=2.ckpt"]  # after the validation
    (csv_dir,) = (tmp / "csv" / "lightning_logs").iterdir()  # the CSVLogger's own folder: its metrics, no more
    assert sorted(p.name for p in csv_dir.iterdir()) == ["hparams.yaml", "metrics.csv"]
    assert sorted(p.name for p in tmp.iterdir()) == ["csv", "logs"]
    with open(csv_dir / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [1, 2, 3]  # the same steps as TensorBoard's
    assert {"train/lr", "train/grad_norm", "val/loss"} <= set(rows[0])


def test_the_printed_validate_command_of_such_a_run_works(csv_run, tmp_path):
    _, run, _, out = csv_run
    (line,) = [ln for ln in out.splitlines() if "python -m fff_lightning validate" in ln]
    argv = shlex.split(line[line.index("python -m fff_lightning validate") :])[3:]
    assert argv[argv.index("--config") + 1] == str(run / "config.yaml")
    (run / "validation.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        run_lightning([*argv, "--trainer.limit_val_batches", "1"])
    assert (run / "validation.json").is_file() and not list(tmp_path.iterdir())


def test_tensorboard_has_the_learning_rate_and_gradient_norm_at_the_steps_the_text_counts(csv_run):
    _, run, _, out = csv_run
    m = re.search(r"last validation \(step (\d+) of (\d+)\)", out)
    assert m, out
    table_step, last_step = int(m.group(1)), int(m.group(2))
    loss = scalars(run, "train/loss")
    assert sorted(loss) == [1, 2, 3] and max(loss) == last_step == 3  # "step N": after N optimizer steps
    assert sorted(scalars(run, "val/loss")) == [table_step] == [2]  # the table's step, as the text says
    lr = scalars(run, "train/lr")  # tiny.yaml: lr 1e-2, 5 warm-up steps: step k uses lr * k / 6
    assert sorted(lr) == [1, 2, 3] and all(lr[k] == pytest.approx(1e-2 * k / 6) for k in lr)
    norm = scalars(run, "train/grad_norm")
    assert sorted(norm) == [1, 2, 3] and all(0 < v < float("inf") for v in norm.values())


def test_the_run_folders_logger_comes_first_and_a_saved_configs_own_is_replaced(csv_run):
    import yaml
    from jsonargparse import Namespace

    from fff_lightning.runs import RunFolder

    _, run, _, _ = csv_run
    folder = RunFolder("fit", str(run.parent.parent), "tiny", "new", run.parent / "new")
    ours = folder.logger()
    assert ours.init_args.version == "new" and folder.logger(None) == ours and folder.logger(True) == ours
    csv_logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="csv"))
    assert folder.logger(csv_logger) == [ours, csv_logger]
    # A run's saved config.yaml given again (fit --config <run>/config.yaml): its TensorBoard logger into the old
    # run's folder is a run folder's own, replaced by the new run's; its other loggers stay. Before, the new run
    # wrote its events, checkpoints and config into the old run's folder.
    saved = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]
    given = [Namespace(class_path=g["class_path"], init_args=Namespace(**g["init_args"])) for g in saved]
    assert given[0].init_args.version == run.name
    assert folder.logger(given) == [ours, given[1]] and folder.logger(given[0]) == ours
    # ... and so is one into another experiment or logs folder (fit --config <run>/config.yaml --experiment other)
    elsewhere = Namespace(class_path=given[0].class_path, init_args=Namespace(**{**vars(given[0].init_args),
                                                                               "save_dir": "/elsewhere/logs"}))  # fmt: skip
    other = RunFolder("fit", str(run.parent.parent), "other", "new", run.parent.parent / "other" / "new")
    assert other.logger(elsewhere) == other.logger()
    # A TensorBoard logger of one's own, elsewhere, logs beside ours.
    other_tb = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                         init_args=Namespace(save_dir="tb", name="x"))  # fmt: skip
    assert folder.logger([other_tb]) == [ours, other_tb]


def test_a_failed_fit_leaves_no_empty_experiment_folder(tmp_path, capsys, monkeypatch):
    # A bad option value found after the run folder was claimed: the run folder and the experiment folder go.
    with pytest.raises(SystemExit) as e:
        main(quick_args(tmp_path / "logs", "--trainer.val_check_interval", "1000", steps=2))
    assert e.value.code == 2 and "trainer.val_check_interval" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()
    # An experiment folder it did not create, or one holding another run, stays.
    (tmp_path / "mine" / "tiny" / "other").mkdir(parents=True)
    (tmp_path / "empty" / "tiny").mkdir(parents=True)
    for logs in ("mine", "empty"):
        with pytest.raises(SystemExit):
            main(quick_args(tmp_path / logs, "--trainer.val_check_interval", "1000", steps=2))
    assert [p.name for p in (tmp_path / "mine" / "tiny").iterdir()] == ["other"]
    assert (tmp_path / "empty" / "tiny").is_dir() and not list((tmp_path / "empty" / "tiny").iterdir())

    # A failure while the model loads (here a bug: its traceback stays).
    from fff_lightning.module import FFFModule

    def broken(self):
        raise RuntimeError("the model failed to load")

    monkeypatch.setattr(FFFModule, "configure_model", broken)
    with pytest.raises(RuntimeError, match="failed to load"):
        main(quick_args(tmp_path / "logs2", "--trainer.limit_val_batches", "0", steps=2))
    assert not (tmp_path / "logs2").exists()


def test_a_failed_validate_leaves_no_empty_out_dir(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "out" / "v", tmp_path / "kept"):
        with pytest.raises(SystemExit) as e:
            main(["validate", "--config", QUICK, "--allow_untrained", "true", "--out_dir", str(out),
                  "--data.paths", f"{{metamath: {empty}}}"])  # fmt: skip
        assert e.value.code == 2 and "is empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # made by the command, left empty: removed
    assert (tmp_path / "kept").is_dir()  # there before: kept


def test_the_terminal_is_spared_a_zero_flops_line_a_sampler_warning_and_a_bitsandbytes_notice(capsys):
    from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    from fff_lightning import console

    console.setup()
    data = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["Linear"]), ("Params", ["10"]), ("Mode", ["train"]),
            ("FLOPs", ["0"])]  # fmt: skip
    summary = (data, 10, 10, 0.0, {"train": 1, "eval": 0})
    RichModelSummary.summarize(*summary, total_flops=0)
    out = capsys.readouterr().out
    assert "Total params" in out and "Total FLOPs" not in out
    RichModelSummary.summarize(*summary, total_flops=2000)  # counted: shown
    assert "Total FLOPs: 2.0 K" in capsys.readouterr().out

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    summary_log = logging.getLogger("lightning.pytorch.callbacks.model_summary")
    summary_log.addHandler(handler)
    try:
        ModelSummary.summarize(*summary, total_flops=0)
    finally:
        summary_log.removeHandler(handler)
    (text,) = [r.getMessage() for r in records]
    assert "Total params" in text and "Total Flops" not in text

    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("You are using a custom batch sampler `PlannedBatchSampler` for prediction. Lightning would "
                      "normally set `drop_last=False`", PossibleUserWarning, stacklevel=1)  # fmt: skip
    assert not caught

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not all(f.filter(logging.LogRecord(bnb.name, logging.WARNING, __file__, 1, "Failed to load CPU "
                   "gemm_4bit_forward from kernels-community: %s", ("x",), None)) for f in bnb.filters)  # fmt: skip
