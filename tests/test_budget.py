"""Budgets on the real Mistral-7B shape (meta device, no weights) and the --match solver."""

from pathlib import Path

import pytest

from fff_lightning.adapters import count_adapters
from fff_lightning.budget import count_budget, match_fff_width, match_lora_rank
from fff_lightning.run_config import describe_run
from fff_lightning.spec import BaseModelConfig, FFFConfig, LoRAConfig

CONFIGS = Path(__file__).parent.parent / "configs"
LORA_PER_RANK_7B = 2_621_440  # 32 layers x (q 8192 + k 5120 + v 5120 + o 8192 + gate/up 18432 x 2 + down 18432)


@pytest.fixture(scope="module")
def mistral7b():
    return BaseModelConfig(name_or_path="mistralai/Mistral-7B-v0.1").shape()


def test_step2_fff_plus_lora_budget_is_the_research_figure():
    run = describe_run(CONFIGS / "step2.yaml").model
    b = count_adapters(run.adapters, run.base_shape())
    assert b.fff == 7 * 6 * (3 * 4096 * 128 + 4096) == 66_232_320
    assert b.lora == 24 * LORA_PER_RANK_7B == 62_914_560
    assert b.trainable == 129_146_880
    assert b.base == 7_241_732_096


def test_step2_lora_baseline_budget_is_the_research_figure():
    run = describe_run(CONFIGS / "step2_lora.yaml").model
    b = count_adapters(run.adapters, run.base_shape())
    assert (b.fff, b.lora) == (0, 46 * LORA_PER_RANK_7B) == (0, 120_586_240)


def test_match_lora_rank_is_the_closest(mistral7b):
    m = match_lora_rank(mistral7b, 129_146_880)
    assert m.value == 49 and m.budget.trainable == 49 * LORA_PER_RANK_7B
    for r in (48, 50):
        assert abs(m.difference) < abs(r * LORA_PER_RANK_7B - 129_146_880)


def test_match_fff_width_reaches_a_lora_budget(mistral7b):
    fff = FFFConfig(n_sublayers=6, width=128, activation="gelu_new", layers="13-19")
    m = match_fff_width(mistral7b, 46 * LORA_PER_RANK_7B, fff, LoRAConfig(preset="r24"))
    per_width = 7 * 6 * 3 * 4096
    assert m.field == "fff.width" and m.value == round((120_586_240 - 62_914_560 - 7 * 6 * 4096) / per_width)
    assert abs(m.difference) <= per_width / 2


def test_budget_counts_follow_layer_and_target_choices(mistral7b):
    fff = FFFConfig(n_sublayers=2, width=[64, 32], targets=["up_proj", "gate_proj"], layers="0,31")
    lora = LoRAConfig(r=8, target_modules=["q_proj", "v_proj"], layers="0-3")
    b = count_budget(mistral7b, fff, lora)
    assert b.fff == 2 * 2 * ((3 * 4096 * 64 + 4096) + (3 * 4096 * 32 + 4096))
    assert b.lora == 4 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_step2_budget_guard_checks_against_the_lora_config_it_names():
    """configs/step2.yaml's guard names step2_lora.yaml next to it: the research's pair is 7.1% apart, inside the
    config's 8%; a tighter tolerance stops the run before anything loads."""
    from types import SimpleNamespace

    from fff_lightning.callbacks import ParameterBudget

    from fff_lightning.errors import ConfigError

    cli = describe_run(CONFIGS / "step2.yaml")
    guard = next(c for c in cli.config.trainer.callbacks if c.class_path.endswith("ParameterBudget"))
    target = guard.init_args.target
    assert Path(target).is_absolute() and Path(target).name == "step2_lora.yaml"
    trainer = SimpleNamespace(is_global_zero=True, loggers=[])
    ParameterBudget(target=target, tolerance=guard.init_args.tolerance).preflight(trainer, cli.model)
    with pytest.raises(ConfigError, match=r"off budget: 129,146,880 trainable vs target 120,586,240 \(\+7\.10%"):
        ParameterBudget(target=target, tolerance=0.05).preflight(trainer, cli.model)


def test_budget_target_and_the_guard_count_the_other_config_on_this_runs_base(capsys):
    """`budget --target <config>` and the guard agree: the other config's adapters on this run's base model."""
    import json

    from fff_lightning.callbacks import ParameterBudget

    from fff_lightning.budget_cli import main as budget_main

    tiny = ["--model.base.backend", "tiny", "--model.fff.layers", "1-2"]
    lora = str(CONFIGS / "step2_lora.yaml")
    budget_main(["--config", str(CONFIGS / "step2.yaml"), *tiny, "--match", "fff_width", "--target", lora, "--json"])
    target = json.loads(capsys.readouterr().out)["match"]["target"]
    run = describe_run(CONFIGS / "step2.yaml", overrides=tiny).model
    assert target == ParameterBudget(target=lora)._target(run.base_shape())
    assert target < 1_000_000  # counted on the tiny model, not on the 7B the LoRA config names
