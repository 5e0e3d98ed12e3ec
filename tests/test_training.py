"""fit / validate / predict through the CLI on the tiny model: reproducibility, resume, checkpoints, tables."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QUICK, quick_args, run_cli, scalars

from fff_lightning.adapters import is_adapter
from fff_lightning.lightning_cli import run_lightning


def fit_args(logs, *extra, steps=6):
    return quick_args(logs, *extra, steps=steps)


def only_run(logs: Path) -> Path:
    runs = [p for p in (logs / "tiny").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_fit_then_validate_end_to_end_through_the_real_cli(tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "fff_lightning", *fit_args(logs, "--trainer.val_check_interval", "6")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = only_run(logs)
    assert run.name == "lora-[32]-2-[gelu_new]-[up_proj]"  # the research's legend style
    assert list(run.glob("events.out.tfevents.*")) and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "parameter budget: FFF 24,832 | LoRA 32,768 | trainable 57,600" in out.stdout
    assert "throughput: median" in out.stdout

    rows = json.loads((run / "validation.json").read_text())
    assert [r["dataset"] for r in rows] == ["magicoder", "metamath", "ultrachat", "artificial_thinker"]
    assert [r["seen_in_training"] for r in rows] == [False, False, False, True]
    with open(run / "validation.csv") as fh:
        from_csv = list(csv.DictReader(fh))
    md = (run / "validation.md").read_text()
    for r, c in zip(rows, from_csv, strict=True):
        assert c["dataset"] == r["dataset"] and int(c["tokens"]) == r["tokens"] and int(c["rows"]) == r["rows"]
        assert float(c["loss"]) == pytest.approx(r["loss"], abs=1e-6)
        assert f"| {r['dataset']} | {r['rows']} | {r['tokens']} | {r['loss']:.6f} |" in md
    logged = scalars(run, "val/metamath/loss")
    assert list(logged.values())[-1] == pytest.approx(rows[1]["loss"], rel=1e-6)

    # validate: base model + the saved adapters, from another folder; the table equals the one after training.
    (run / "validation.json").unlink()
    cmd = [
        sys.executable,
        "-m",
        "fff_lightning",
        "validate",
        "--config",
        QUICK,
        "--model.adapter_path",
        str(run / "adapter"),
    ]
    out = run_cli(cmd[3:], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    again = json.loads((run / "validation.json").read_text())
    for a, b in zip(rows, again, strict=True):
        assert (a["dataset"], a["rows"], a["tokens"]) == (b["dataset"], b["rows"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert "mean loss" in out.stdout and "perplexity" in out.stdout
    assert not (tmp_path / "config.yaml").exists()  # validate writes nothing into the working folder


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_losses(tmp_path):
    a = scalars(only_run_of(run_lightning(fit_args(tmp_path / "a", steps=5))), "train/loss")
    b = scalars(only_run_of(run_lightning(fit_args(tmp_path / "b", steps=5))), "train/loss")
    assert len(a) == 5 and a == b
    c = scalars(only_run_of(run_lightning(fit_args(tmp_path / "c", "--model.seed", "13", steps=5))), "train/loss")
    assert c != a


def only_run_of(cli) -> Path:
    return Path(cli.trainer.log_dir)


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_interrupt_and_resume_equals_an_uninterrupted_run(tmp_path, packing):
    every4 = [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        *(["--data.packing", "true", "--data.tokens_per_batch", "1024"] if packing else []),
    ]
    full = run_lightning(fit_args(tmp_path / "full", *every4, steps=8))
    full_losses = scalars(Path(full.trainer.log_dir), "train/loss")
    ckpt = next(Path(full.trainer.log_dir, "checkpoints").glob("*step=4.ckpt"))
    resumed = run_lightning(fit_args(tmp_path / "resumed", "--ckpt_path", str(ckpt), *every4[3:], steps=8))
    resumed_losses = scalars(Path(resumed.trainer.log_dir), "train/loss")
    steps = sorted(full_losses)
    assert len(steps) == 8 and sorted(resumed_losses) == steps[4:]  # mid-epoch: an epoch is 32 (packed: 24) batches
    assert [resumed_losses[s] for s in steps[4:]] == [full_losses[s] for s in steps[4:]]
    fff = lambda cli: next(p for n, p in cli.model.model.named_parameters() if ".fff_blocks.1.d_proj" in n)  # noqa: E731
    assert torch.equal(fff(full), fff(resumed))


def test_checkpoint_holds_no_frozen_weight(trained_run):
    ckpt = torch.load(trained_run.ckpt, weights_only=True)
    keys = set(ckpt["state_dict"])
    trainable = {f"model.{n}" for n, p in trained_run.module.model.named_parameters() if p.requires_grad}
    assert keys == trainable and all(is_adapter(k) for k in keys)
    assert sum(t.numel() for t in ckpt["state_dict"].values()) == 57_600
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"] and ckpt["loops"]


def test_checkpoint_of_other_adapters_is_refused(trained_run):
    from fff_lightning.errors import ConfigError
    from fff_lightning.module import FFFModule
    from fff_lightning.spec import FFFConfig

    ckpt = torch.load(trained_run.ckpt, weights_only=True)
    run = trained_run.module.adapters
    other = FFFModule(base=trained_run.module.base, fff=FFFConfig(n_sublayers=2, width=16, layers="1-2"), lora=run.lora)
    with pytest.raises(ConfigError, match="the checkpoint holds other adapters"):
        other.on_load_checkpoint(ckpt)
    other.allow_resume_changes = True  # "I mean it" does not make tensors of another shape fit
    with pytest.raises(ConfigError, match="checkpoint does not match the configured adapters"):
        other.on_load_checkpoint(ckpt)
    same = FFFModule(base=trained_run.module.base, fff=run.fff, lora=run.lora)
    same.on_load_checkpoint(ckpt)  # no error


@pytest.mark.slow
def test_off_budget_run_stops_before_training(tmp_path):
    overlay = tmp_path / "guard.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: fff_lightning.callbacks.ParameterBudget\n"
        "      init_args: {target: 60000, tolerance: 0.01}\n"
    )
    out = run_cli([*fit_args(tmp_path / "logs"), "--config", str(overlay)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "off budget: 57,600 trainable vs target 60,000 (-4.00%, tolerance 1.00%); not training" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "logs").exists()  # nothing trained, no folder left behind
    # Within tolerance it trains.
    overlay.write_text(overlay.read_text().replace("tolerance: 0.01", "tolerance: 0.05"))
    ok = run_lightning([*fit_args(tmp_path / "ok", steps=1), "--config", str(overlay)])
    assert ok.trainer.global_step == 1


def test_predict_answers_prompts_from_a_file(tmp_path, trained_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "Write a function that adds two numbers."}\n')
    adapter = trained_run.run / "adapter"
    args = ["predict", "--config", QUICK, "--model.adapter_path", str(adapter), "--data.predict_file", str(prompts)]
    run_lightning(
        [*args, "--model.max_new_tokens", "8", "--trainer.enable_progress_bar", "false", "--out_dir", str(tmp_path)]
    )
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [p["prompt"] for p in preds] == ["What is 2 + 2?", "Write a function that adds two numbers."]
    assert all(isinstance(p["answer"], str) for p in preds)


@pytest.mark.slow
def test_help_needs_no_model(tmp_path):
    out = run_cli(["fit", "--help"])
    assert out.returncode == 0 and "--model.fff" in out.stdout and "--data.paths" in out.stdout
    out = run_cli([])
    assert out.returncode == 0 and "budget" in out.stdout and "validate" in out.stdout
