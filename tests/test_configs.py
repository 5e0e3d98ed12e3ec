"""Every YAML in configs/ parses through the CLI and builds its model and data module (no weights loaded)."""

from pathlib import Path

import pytest

from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.module import FFFModule
from fff_lightning.run_config import describe_run

ALL = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
GRIDS = [p for p in ALL if any(line.startswith("sweep:") for line in p.read_text().splitlines())]
CONFIGS = [p for p in ALL if p not in GRIDS]


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "step2.yaml", "step2_lora.yaml"}
    real = {"real_seeds.yaml", "real_step1_seeds.yaml", "real_seeds_cpu.yaml"}
    assert {p.name for p in GRIDS} == {f"step1_{s}.yaml" for s in ("i", "ii", "iii", "iv")} | {
        "step2_seeds.yaml"
    } | real


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_research_grid_expands_into_runs_whose_budgets_its_comment_states(path):
    from fff_lightning.sweep import expand, load_grid

    grid = load_grid(path)
    runs = expand(grid)
    # every step compares FFF with budget-matched LoRA: a baseline per FFF run, or a LoRA arm
    assert runs and (any(r.baseline_of for r in runs) or "lora" in (grid.arms or {}))
    text = path.read_text()
    for run in runs:
        assert run.trainable and f"{run.trainable:,}" in text, run.name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(path, monkeypatch):
    monkeypatch.chdir("/")  # configs name each other relative to themselves, wherever the run starts
    cli = describe_run(path)
    assert isinstance(cli.model, FFFModule) and isinstance(cli.datamodule, FFFDataModule)
    assert cli.model.adapters.fff is not None or cli.model.adapters.lora is not None


def test_step2_pair_matches_the_research():
    root = CONFIGS[0].parent
    fff = describe_run(root / "step2.yaml").model.adapters
    lora = describe_run(root / "step2_lora.yaml").model.adapters
    assert (fff.fff.n_sublayers, fff.fff.width, fff.fff.activation, fff.fff.layers, fff.fff.init) == (
        6,
        128,
        "gelu_new",
        "13-19",
        "normal",
    )
    assert (fff.lora.rank, fff.lora.lora_alpha, lora.lora.rank, lora.lora.lora_alpha) == (24, 12, 46, 23)
    m = describe_run(root / "step2.yaml").model
    assert m.optim["name"] == "adamw_8bit" and m.optim["lr"] == 5e-5
    assert m.sched == {"name": "linear", "warmup": 1, "from_zero": True}  # the research's first step at lr 0
    dm = describe_run(root / "step2.yaml").datamodule
    assert (dm.opts.eos, dm.opts.system_turns, dm.shuffle, dm.drop_last) == (False, "drop", "datasets", True)
    assert [s.name for s in dm.sources] == ["metamath", "magicoder", "ultrachat", "artificial_thinker"]
    assert describe_run(root / "step2.yaml").model.adapters.fff.eps == 1e-6


def test_gpu_smoke_overlay_stacks_on_step2(monkeypatch):
    root = CONFIGS[0].parent.parent
    monkeypatch.chdir(root)
    cli = check_config_stack(["configs/step2.yaml", "configs/overlays/gpu_smoke.yaml"])
    assert [s.name for s in cli.datamodule.sources][-1] == "long"
    assert cli.model.adapters.fff.width == 128


def test_packed_overlay_stacks_on_both_step2_configs(monkeypatch):
    monkeypatch.chdir(CONFIGS[0].parent.parent)
    for run in ("configs/step2.yaml", "configs/step2_lora.yaml"):
        dm = check_config_stack([run, "configs/overlays/packed.yaml"]).datamodule
        assert dm.packing and dm.tokens_per_batch == 3 * 2048 and dm.batch_size == 3
        assert not check_config_stack([run]).datamodule.packing  # the research's configs stay padded


def check_config_stack(paths):
    return describe_run(*paths)


def test_a_dataset_is_pointed_at_local_files_from_the_command_line(tmp_path):
    f = tmp_path / "mm.jsonl"
    f.write_text('{"query": "q", "response": "r"}\n')
    cli = describe_run(CONFIGS[0].parent / "step2.yaml", overrides=["--data.paths", f"{{metamath: {f}}}"])
    by = {s.name: s for s in cli.datamodule.sources}
    assert by["metamath"].path == str(f) and by["magicoder"].path == "ise-uiuc/Magicoder-OSS-Instruct-75K"


def test_the_seeds_grid_runs_step2_and_its_lora_baseline_per_seed():
    from fff_lightning.sweep import expand, load_grid

    runs = expand(load_grid(CONFIGS[0].parent / "step2_seeds.yaml"))
    assert sorted((r.arm, r.seed, r.trainable) for r in runs) == sorted(
        [("fff", s, 129_146_880) for s in (12, 13, 14)] + [("lora", s, 120_586_240) for s in (12, 13, 14)]
    )
    assert all(r.name == f"{r.group}-seed={r.seed}" and f"--model.seed={r.seed}" in r.overrides for r in runs)
    assert not any(o.startswith("--data.seed") for r in runs for o in r.overrides)  # the research's data order
