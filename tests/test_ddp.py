"""Several processes (DDP through Lightning): two CPU processes (gloo) on the tiny model must train and validate
like one process with twice the batch, resume exactly, and write each file once."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import adapter_weights, losses, quick_args, run_cli
from lightning.pytorch.strategies import DDPStrategy

from fff_lightning.cli import main
from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.data.sources import SourceConfig
from fff_lightning.distributed import check_strategy_name
from fff_lightning.errors import ConfigError
from fff_lightning.lightning_cli import run_lightning

TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def args(logs, *extra, batch=8, steps=6, command="fit"):
    vals = ("--data.batch_size", str(batch), "--trainer.val_check_interval", str(steps))
    return quick_args(logs, *vals, *extra, steps=steps, command=command)


def two_processes(logs, *extra, command="fit", **kw):
    return run_cli(args(logs, *TWO, *extra, batch=4, command=command, **kw), cwd=logs)


def table(folder: Path) -> list[dict]:
    return json.loads((folder / "validation.json").read_text())


def assert_same_table(a: list[dict], b: list[dict]) -> None:
    assert [(r["dataset"], r["rows"], r["tokens"]) for r in a] == [(r["dataset"], r["rows"], r["tokens"]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-5), x["dataset"]


def run_folders(logs: Path) -> list[Path]:
    return [p for p in (logs / "tiny").iterdir() if p.is_dir()]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """One process, batch 8, 6 steps: what two processes of batch 4 must equal."""
    logs = tmp_path_factory.mktemp("one")
    cli = run_lightning(args(logs, batch=8))
    return Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    logs = tmp_path_factory.mktemp("two")
    out = two_processes(logs)
    assert out.returncode == 0, out.stderr[-3000:]
    return logs, out


# -- which samples each process sees -------------------------------------------------------------------------------
def _module(tmp_path, world: int, rank: int, limit_val_batches=1.0, **kw) -> FFFDataModule:
    sources = [
        SourceConfig("magicoder", "bundled:magicoder", "magicoder", train_rows=25, val_rows=7),
        SourceConfig("ultrachat", "bundled:ultrachat", "ultrachat", train_rows=12, val_rows=5),
    ]
    module = FFFDataModule(sources, cache_dir=str(tmp_path), max_seq_length=256, **kw)
    module.trainer = SimpleNamespace(
        world_size=world,
        global_rank=rank,
        num_devices=world,
        num_nodes=1,
        limit_val_batches=limit_val_batches,
        strategy=DDPStrategy() if world > 1 else None,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=False),
    )
    module.setup("fit")
    return module


def _samples(module, plan):
    return [[module.train_set.order[i] for i in batch] for batch in plan]


@pytest.mark.parametrize("group", [False, True])
def test_each_step_of_two_processes_is_one_process_step_of_twice_the_batch(tmp_path, group):
    one = _module(tmp_path, 1, 0, batch_size=8, group_by_length=group)
    ranks = [_module(tmp_path, 2, r, batch_size=4, group_by_length=group) for r in (0, 1)]
    single = _samples(one, one.train_batches)
    split = [_samples(m, m.train_batches) for m in ranks]
    assert len(split[0]) == len(split[1]) == len(single)  # the same number of optimizer steps
    for k, batch in enumerate(single):
        assert split[0][k] + split[1][k] == batch  # in order, nothing overlapping, nothing left out
    # The loaders yield exactly these batches, and a resume skips the same steps on every process.
    loader = ranks[1]._loader(ranks[1].train_set, ranks[1].train_batches, skip=2)
    assert [b["num_samples"] for b in loader] == [len(b) for b in ranks[1].train_batches[2:]]


def test_packed_steps_are_shared_out_without_overlap(tmp_path):
    one = _module(tmp_path, 1, 0, batch_size=4, packing=True, tokens_per_batch=512)
    ranks = [_module(tmp_path, 2, r, batch_size=4, packing=True, tokens_per_batch=512) for r in (0, 1)]
    steps = len(one.train_batches) // 2
    assert len(ranks[0].train_batches) == len(ranks[1].train_batches) == steps
    for k in range(steps):
        assert [ranks[0].train_batches[k], ranks[1].train_batches[k]] == one.train_batches[2 * k : 2 * k + 2]


def test_validation_batches_are_shared_out_once_each(tmp_path):
    one = _module(tmp_path, 1, 0, batch_size=2)
    ranks = [_module(tmp_path, 3, r, batch_size=2) for r in (0, 1, 2)]
    for d in range(len(one.val_sets)):
        together = sorted(i for m in ranks for b in m.val_batches[d] for i in b)
        assert together == sorted(i for b in one.val_batches[d] for i in b) == list(range(len(one.val_sets[d])))
    counts = [sum(len(plan) for plan in m.val_batches) for m in ranks]
    assert max(counts) - min(counts) <= 1  # dealt across the datasets together
    # Fewer batches in all than processes: one process would have none and leave the others waiting.
    with pytest.raises(ConfigError, match="fewer than the 8 processes"):
        _module(tmp_path, 8, 0, batch_size=4)
    _module(tmp_path, 8, 0, batch_size=4, limit_val_batches=0)  # no validation: nothing to refuse


def test_unsupported_strategies_are_refused_by_name():
    for name in ("fsdp", "deepspeed_stage_2", "ddp_spawn", "ddp_notebook", "lightning.pytorch.strategies.FSDPStrategy"):
        with pytest.raises(ConfigError, match="trainer.strategy"):
            check_strategy_name(name)
    for name in ("auto", "ddp", "ddp_find_unused_parameters_true", "single_device"):
        check_strategy_name(name)


def test_a_refused_strategy_is_one_line_before_anything_is_made(tmp_path, capsys):
    for extra in (
        ["--trainer.strategy", "fsdp"],
        ["--trainer.strategy", "ddp", "--trainer.use_distributed_sampler", "true"],
    ):
        with pytest.raises(SystemExit) as e:
            main(args(tmp_path, *extra, "--trainer.devices", "2", "--trainer.accelerator", "cpu"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("error: trainer.")
        made = tmp_path / "tiny"
        assert not made.exists() or not list(made.iterdir())  # no run folder left behind


# -- two real processes --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_and_validate_like_one_with_twice_the_batch(one, two):
    logs, out = two
    (run,) = run_folders(logs)  # one folder: only the first process claims and writes
    assert_same_table(table(run), table(one))
    got, ref = adapter_weights(run / "adapter"), adapter_weights(one / "adapter")
    assert all(torch.allclose(got[k], ref[k], atol=1e-4, rtol=1e-4) for k in ref)
    ref_losses, got_losses = losses(one), losses(run)
    assert sorted(got_losses) == sorted(ref_losses) == list(range(1, 7))  # step N: after N optimizer steps
    assert all(got_losses[s] == pytest.approx(ref_losses[s], rel=1e-5) for s in ref_losses)  # the mean over both
    # Each file once: one event file, one checkpoint, one table printed, one data summary.
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch=0-step=6.ckpt"]
    assert out.stdout.count("validation after training") == 1 and out.stdout.count("data: ") == 1
    assert "2 processes" in out.stdout and "tokens/s of all of them" in out.stdout
    # Per-sample losses: gathered from both processes, every validation sample once, written once
    from fff_lightning.table import read_samples

    got, ref = read_samples(run), read_samples(one)
    assert {d: sorted(v) for d, v in got.items()} == {d: sorted(v) for d, v in ref.items()}
    for d, rows in ref.items():
        assert all(got[d][i][0] == n and got[d][i][1] == pytest.approx(v, rel=1e-5) for i, (n, v) in rows.items())
        loss = sum(v for _, v in rows.values()) / sum(n for n, _ in rows.values())
        assert loss == pytest.approx(next(r["loss"] for r in table(one) if r["dataset"] == d), rel=1e-6)  # the table
    assert out.stdout.count("per-sample losses written") == 1


@pytest.mark.slow
def test_validate_on_two_processes_equals_one(one, tmp_path):
    cli = run_lightning(args(tmp_path, "--model.adapter_path", str(one / "adapter"), command="validate"))
    single = [{k: r[k] for k in ("dataset", "rows", "tokens", "loss")} for r in cli.model.last_results]
    out = two_processes(tmp_path, "--model.adapter_path", str(one / "adapter"), command="validate")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("validation: ") == 1
    assert_same_table(table(one), single)  # the two-process validate wrote the run's table last


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_exactly(two, tmp_path, capsys):
    # Only the first process gets the signal (a `kill` of the launching process): both stop at the same step, the
    # one after the signal's (the flag is shared a step late, so no process waits for its device).
    fault = json.dumps({"class_path": "faults.SignalAtStep", "init_args": {"step": 3, "signum": "SIGTERM", "rank": 0}})
    out = two_processes(tmp_path, f"--trainer.callbacks+={fault}")
    assert out.returncode == 143, out.stderr[-3000:]
    assert out.stderr.count("interrupted by SIGTERM at step 4") == 1  # one line, from the first process
    (run,) = run_folders(tmp_path)
    ckpt = run / "checkpoints" / "interrupted-step=4.ckpt"
    assert ckpt.is_file()
    # Resuming on another number of processes would point at other samples: refused before anything loads.
    with pytest.raises(SystemExit) as e:
        main(args(tmp_path, "--run_name", run.name, "--ckpt_path", str(ckpt), batch=4))
    assert e.value.code == 2 and "trainer.devices" in capsys.readouterr().err
    resumed = two_processes(tmp_path, "--run_name", run.name, "--ckpt_path", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref_logs, _ = two
    (ref,) = run_folders(ref_logs)
    got, want = adapter_weights(run / "adapter"), adapter_weights(ref / "adapter")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert_same_table(table(run), table(ref))


def test_the_shared_stop_flag_waits_only_before_a_validation_or_the_end(tmp_path):
    """A signal is acted on a step late (read without waiting for the device), except when a validation or the
    end of training follows the step: then at once, so it never waits for a whole validation or gets lost."""
    import lightning as L
    from fff_lightning.callbacks import GracefulInterrupt

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:

        def step(cb, validation_follows=False, last=False):
            loop = SimpleNamespace(
                _is_training_done=last,
                batch_progress=SimpleNamespace(is_last_batch=False),
                _should_check_val_fx=lambda fetcher: validation_follows,
            )
            trainer = SimpleNamespace(world_size=2, fit_loop=SimpleNamespace(epoch_loop=loop, _data_fetcher=None))
            return cb._stop_together(trainer, SimpleNamespace(device=torch.device("cpu")))

        cb = GracefulInterrupt()
        assert step(cb) is False
        cb.signum = 15  # arrives during the next step
        assert step(cb) is False  # read a step late ...
        assert step(cb) is True  # ... by every process at the same step
        for where in ({"validation_follows": True}, {"last": True}):
            cb = GracefulInterrupt()
            step(cb)
            cb.signum = 15
            assert step(cb, **where) is True  # at once
    finally:
        torch.distributed.destroy_process_group()
    # The loop attributes read are Lightning's own: a Lightning without them would read the flag every step.
    loop = L.Trainer(accelerator="cpu", logger=False).fit_loop.epoch_loop
    assert hasattr(loop, "_should_check_val_fx") and hasattr(loop.batch_progress, "is_last_batch")
    assert isinstance(loop._is_training_done, bool)
