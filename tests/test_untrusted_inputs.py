"""Inputs a user did not write, or wrote wrong: checkpoints that would run code or hold the wrong things, sizes that
would fill the memory, prompt files, names that would leave their folder, report inputs. Each is refused in one line
(exit 2) before it costs memory, and leaves no run folder behind. docs/reliability.md lists them with these tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, QUICK, quick_args

from fff_lightning.cli import main
from fff_lightning.lightning_cli import run_lightning


def args(logs, *extra, steps=2, command="fit"):
    return quick_args(logs, "--trainer.limit_val_batches", "1", *extra, steps=steps, command=command)


def refused(argv, capsys, code=2) -> str:
    """Run the command in this process; assert one line on stderr and ``code``; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert e.value.code == code, err
    assert err and "Traceback" not in "\n".join(err), err
    return err[-1]


def no_run_folder(logs: Path) -> bool:
    folder = Path(logs) / "tiny"
    return not folder.exists() or not [p for p in folder.iterdir() if p.is_dir()]


@pytest.fixture
def trained(trained_run):
    """A 2-step run with a checkpoint and an adapter folder, for the tests to damage copies of."""
    return trained_run.run, trained_run.ckpt


# -- checkpoints -------------------------------------------------------------------------------------------------
class MakesAFile:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, trained, capsys):
    _, good = trained
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(good, weights_only=True)
    checkpoint["callbacks"] = {"x": MakesAFile(marker)}
    torch.save(checkpoint, evil)
    logs = tmp_path / "logs"
    for command in ("fit", "validate"):
        line = refused(args(logs, "--ckpt_path", str(evil), command=command), capsys)
        assert line.startswith("error: ckpt_path:") and "nothing of it was run" in line, line
        assert not marker.exists(), f"{command} ran the checkpoint's code"
        assert no_run_folder(logs)


def _damaged(tmp_path, good, name, change):
    checkpoint = torch.load(good, weights_only=True)
    change(checkpoint)
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


def test_checkpoints_with_entries_of_the_wrong_kind_are_refused_before_anything_loads(tmp_path, trained, capsys):
    import numpy as np

    _, good = trained
    first = lambda c: next(iter(c["state_dict"]))  # noqa: E731
    cases = {
        "adapters a string": (lambda c: c.update(fff_adapters="lora"), "'fff_adapters' is str"),
        "adapters of a bad shape": (lambda c: c.update(fff_adapters={"fff": "x", "lora": None}), "is damaged"),
        "state_dict a list": (lambda c: c.update(state_dict=[1, 2]), "'state_dict' is list"),
        "a numpy array": (lambda c: c.update(extra=np.zeros(3)), "only code could rebuild"),
        "a NaN weight": (lambda c: c["state_dict"][first(c)].fill_(float("nan")), "NaN or infinite"),
        "an integer weight": (
            lambda c: c["state_dict"].update({first(c): torch.zeros(3, dtype=torch.int64)}),
            "not floating point",
        ),  # fmt: skip
        "optimizer state a string": (lambda c: c.update(optimizer_states="adam"), "'optimizer_states' is str"),
        "a global_step of -5": (lambda c: c.update(global_step=-5), "negative"),
    }
    logs = tmp_path / "logs"
    for name, (change, says) in cases.items():
        path = _damaged(tmp_path, good, name.replace(" ", "_"), change)
        line = refused(args(logs, "--ckpt_path", str(path)), capsys)
        assert line.startswith("error: ckpt_path:") and says in line, (name, line)
    assert no_run_folder(logs)


# -- sizes: checked before anything is allocated (under a memory limit that an allocation would exceed) ----------
BOUNDED = r"""
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
from fff_lightning.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue().strip().splitlines()[-1:] or [""]])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_sizes_are_checked_before_anything_is_allocated(tmp_path):
    rows = tmp_path / "mm.jsonl"
    rows.write_text("".join(json.dumps({"query": f"q{i}", "response": "r"}) + "\n" for i in range(40)))
    logs = tmp_path / "logs"
    cases = {
        "FFF width 10**9": (["--model.fff.width", str(10**9)], "error: model.fff: the adapters would have"),
        "LoRA rank 10**9": (["--model.lora.r", str(10**9)], "error: model.lora: the adapters would have"),
        "10**6 sub-layers": (["--model.fff.n_sublayers", str(10**6)], "more than the bound of 64"),
        "layers 0-9999999999": (["--model.fff.layers", "0-9999999999"], "is beyond any model (at most 9999)"),
        "layers 2-400": (
            ["--model.fff.layers", "2-400"],
            "layer(s) [4, 5, 6, 7, 8, 9]... do not exist: the model has 4",
        ),
        "max_seq_length 10**9": (["--model.base.max_seq_length", str(10**9)], "error: model.base.max_seq_length"),
        "max_seq_length beyond the positions": (
            ["--model.base.max_seq_length", "40000"],
            "error: model.base.max_seq_length: 40,000 is more than the model's 32,768 positions",
        ),
        "repeat 10**7": (
            ["--data.sources", json.dumps([{"name": "m", "path": str(rows), "schema": "metamath", "repeat": 10**7}])],
            "data.sources.m.repeat: must be an int from 1 to 1000",
        ),
        "batch 10**9": (["--data.batch_size", str(10**9)], "error: data.batch_size: must be an int from 1 to 4,096"),
        "packed rows of 10**12 tokens": (
            ["--data.packing", "true", "--data.tokens_per_batch", str(10**12)],
            "error: data.tokens_per_batch",
        ),
    }
    argvs = [args(logs, *extra) for extra, _ in cases.values()]
    out = subprocess.run([sys.executable, "-c", BOUNDED, json.dumps(argvs)], capture_output=True, text=True, env=ENV,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (name, (_, says)), (code, (line,)) in zip(cases.items(), results, strict=True):
        assert code == 2 and says in line, (name, code, line)
    assert no_run_folder(logs)


def test_deeply_nested_json_is_one_line(tmp_path, trained, capsys):
    import shutil

    run, _ = trained
    deep = "[" * 200_000 + "]" * 200_000
    folder = tmp_path / "adapter"
    shutil.copytree(run / "adapter", folder)
    (folder / "fff_adapter_config.json").write_text(deep)
    line = refused(["validate", "--config", QUICK, "--model.adapter_path", str(folder)], capsys)
    assert "is corrupt" in line or "nested too deeply" in line, line
    line = refused(args(tmp_path / "logs", "--model.fff", deep), capsys)
    assert line.startswith("error:"), line


def test_adapter_folders_are_checked_against_their_config_before_the_model_is_built(tmp_path, trained, capsys,
                                                                                    monkeypatch):  # fmt: skip
    import shutil

    from safetensors.torch import load_file, save_file

    import fff_lightning.backends.hf as hf_backend

    run, _ = trained
    monkeypatch.setattr(hf_backend, "load_pretrained", lambda *a, **k: pytest.fail("built the model before the check"))

    def copy(name, weights=None, config=None):
        folder = tmp_path / name
        shutil.copytree(run / "adapter", folder)
        if weights is not None:
            w = load_file(str(folder / "adapter_model.safetensors"))
            weights(w)
            save_file(w, str(folder / "adapter_model.safetensors"))
        if config is not None:
            c = json.loads((folder / "fff_adapter_config.json").read_text())
            config(c)
            (folder / "fff_adapter_config.json").write_text(json.dumps(c))
        return folder

    def first(w):
        return next(k for k in w if "fff_blocks" in k)

    cases = {
        "integer tensors": (
            copy("ints", weights=lambda w: w.update({first(w): w[first(w)].long()})),
            "not floating point",
        ),  # fmt: skip
        "a tensor of another shape": (
            copy("shape", weights=lambda w: w.update({first(w): torch.zeros(3)})),
            "shape mismatch",
        ),  # fmt: skip
        "a tensor missing": (copy("missing", weights=lambda w: w.pop(first(w))), "missing from the file"),
        "an unknown format_version": (
            copy("version", config=lambda c: c.update(format_version=2)),
            "format_version 2",
        ),  # fmt: skip
        "another base model": (
            copy("base", config=lambda c: c["base_model"].update(hidden_size=4096)),
            "hidden_size 4096",
        ),  # fmt: skip
    }
    for name, (folder, says) in cases.items():
        line = refused(["validate", "--config", QUICK, "--model.adapter_path", str(folder)], capsys)
        assert line.startswith("error: adapter:") and says in line, (name, line)


# -- predict -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_reads_json_and_unicode_lines_cuts_long_prompts_and_writes_where_asked(tmp_path, trained, capsys):
    run, _ = trained
    adapter = ["--model.adapter_path", str(run / "adapter"), "--model.max_new_tokens", "4"]
    base = ["predict", "--config", QUICK, *adapter, "--trainer.enable_progress_bar", "false"]
    long = "word " * 200_000  # about 1 MB: cut to the last tokens that leave room for the answer
    files = {
        "array.json": json.dumps([{"prompt": "one"}, "two"]),
        "lines.json": json.dumps({"prompt": "a\u2028b"}) + "\n" + json.dumps({"prompt": "c\u0085d"}) + "\n",
        "prompts.txt": "first \u2028 still first\nsecond\r\n",
        "long.jsonl": json.dumps({"prompt": long}) + "\n",
    }
    expected = {
        "array.json": ["one", "two"],
        "lines.json": ["a\u2028b", "c\u0085d"],
        "prompts.txt": ["first \u2028 still first", "second"],
        "long.jsonl": [long],
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        main([*base, "--data.predict_file", str(tmp_path / name), "--out_dir", str(out)])
        rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == expected[name], name
    assert "its beginning was cut" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = refused([*base, "--data.predict_file", str(tmp_path / "array.json"), "--out_dir", str(blocker / "x")],
                   capsys)  # fmt: skip
    assert line.startswith("error: out_dir: cannot write to"), line


# -- names that become paths -------------------------------------------------------------------------------------
def test_names_that_become_paths_cannot_leave_their_folder(tmp_path, capsys):
    logs = tmp_path / "logs"
    evil_source = json.dumps([{"name": "../../evil", "path": "bundled:metamath", "schema": "metamath"}])
    for extra, field in (
        (["--data.sources", evil_source], "data.sources.name"),
        (["--run_name", "../outside"], "run_name"),
        (["--experiment", "a/b"], "experiment"),
        (["--run_name", ".."], "run_name"),
    ):
        line = refused(args(logs, *extra), capsys)
        assert line.startswith(f"error: {field}:"), line
    assert not (tmp_path / "outside").exists() and not list(tmp_path.rglob("evil*"))


# -- the environment: disk, cache ----------------------------------------------------------------------------------
def test_a_full_disk_at_start_and_an_unusable_cache_are_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    import shutil

    from fff_lightning import runs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    line = refused(args(tmp_path / "logs"), capsys)
    assert line.startswith("error: logs_dir: only 1 MiB free") and "a checkpoint needs about" in line, line
    assert no_run_folder(tmp_path / "logs")
    monkeypatch.undo()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FFF_CACHE", str(blocker))
    line = refused(args(tmp_path / "logs2"), capsys)
    assert line.startswith("error: FFF_CACHE: cannot write") and "set FFF_CACHE" in line, line
    assert no_run_folder(tmp_path / "logs2")


# -- resuming with new limits ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_of_an_epochs_end_resumes_into_the_next_epoch_exactly(tmp_path):
    from helpers import adapter_weights, losses

    ck = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
          "--trainer.limit_train_batches", "3", "--trainer.max_epochs", "2"]  # fmt: skip
    full = run_lightning(args(tmp_path / "full", *ck, steps=-1))
    run = Path(full.trainer.log_dir)
    end_of_first = next((run / "checkpoints").glob("epoch=0-*.ckpt"))
    resumed = run_lightning(args(tmp_path / "resumed", *ck, "--ckpt_path", str(end_of_first), steps=-1))
    assert resumed.trainer.global_step == 6  # Lightning 2.6 alone counted the finished epoch again: 0 steps
    again = losses(Path(resumed.trainer.log_dir))
    assert again == {s: v for s, v in losses(run).items() if s > 3}  # the steps after the checkpoint's 3rd
    a, b = adapter_weights(run / "adapter"), adapter_weights(Path(resumed.trainer.log_dir) / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The finished run, resumed with a larger limit (its schedule rebuilt on the new total: the user says so),
    # trains on.
    last = next((run / "checkpoints").glob("epoch=1-*.ckpt"))
    more = run_lightning(args(tmp_path / "more", *ck[:4], "--trainer.max_epochs", "3", "--ckpt_path", str(last),
                              "--resume_changes", "allow", steps=100))  # fmt: skip
    assert more.trainer.global_step == 9


def test_a_validation_interval_longer_than_the_epoch_is_one_line_before_the_model_loads(tmp_path, capsys):
    line = refused(args(tmp_path / "logs", "--trainer.val_check_interval", "1000", steps=4), capsys)
    assert line.startswith("error: trainer.val_check_interval: 1000 is more than the"), line
    assert no_run_folder(tmp_path / "logs")


# -- report ------------------------------------------------------------------------------------------------------
def test_report_refuses_tables_that_are_not_tables_and_warns_of_cut_event_files(tmp_path, trained, capsys):
    import shutil

    run, _ = trained
    for i, (text, says) in enumerate((("{}", "holds a JSON dict"), ("[1, 2]", "row 1 is not an object"),
                                      ("[]", "an empty list"))):  # fmt: skip
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        (bad / "validation.json").write_text(text)
        line = refused(["report", str(bad), "--out", str(tmp_path / "out")], capsys)
        assert says in line, line
    cut = tmp_path / "cut"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    rows = json.loads((cut / "validation.json").read_text())
    rows[0]["loss"] = float("nan")
    (cut / "validation.json").write_text(json.dumps(rows))
    events = next(cut.glob("events.out.tfevents.*"))
    events.write_bytes(events.read_bytes()[:-7])
    (tmp_path / "sweep.json").write_text("{}")
    (tmp_path / "cut.failed-1").mkdir()
    capsys.readouterr()
    main(["report", str(cut), str(tmp_path / "sweep.json"), str(tmp_path / "cut.failed-1"), "--out",
          str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert "is cut short at byte" in err and "left out sweep.json (a file), cut.failed-1 (a failed run" in err, err
    assert "nan (NOT FINITE)" in (tmp_path / "out" / "validation.md").read_text()


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--data.val_batch_size", "0"], "data.val_batch_size"),
        (["--data.packing", "true", "--data.tokens_per_batch", "0"], "data.tokens_per_batch"),
        (["--model.betas", "[0.9, 1.5]"], "model.betas"),
        (["--model.weight_decay", "-1"], "model.weight_decay"),
        (["--model.max_new_tokens", "0"], "model.max_new_tokens"),
    ],
)
def test_numeric_options_out_of_range_are_one_line_before_anything_loads(tmp_path, capsys, extra, field):
    # A 0 never silently means "the default", and an optimizer setting torch would refuse after the model and the
    # data were loaded is refused first.
    line = refused(args(tmp_path, *extra), capsys)
    assert line.startswith(f"error: {field}: "), line
    assert no_run_folder(tmp_path)
