"""Adapter kinds as plug-ins (fff_lightning.kinds): DoRA and the parallel bottleneck adapter, each one module, are
counted, trained, saved, reloaded, matched to a budget and compared like FFF and LoRA; a kind from another package
is one module and an entry point."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ENV, QUICK, quick_args

from fff_lightning import kinds
from fff_lightning.adapters import count_adapters
from fff_lightning.errors import ConfigError
from fff_lightning.spec import AdapterSpec, BaseModelConfig

ROOT = Path(__file__).parent.parent
NO_FFF_LORA = ["--model.fff", "null", "--model.lora", "null"]


def tiny_base():
    return BaseModelConfig(backend="tiny", load_in_4bit=False, dtype="float32", gradient_checkpointing=False)


def test_the_shipped_kinds_are_registered_in_the_order_they_go_on_a_model():
    assert kinds.names() == ["fff", "par_bn", "lora", "dora"]
    assert kinds.get("dora").excludes == ("lora",) and kinds.get("lora").excludes == ("dora",)
    with pytest.raises(ConfigError, match="no adapter kind 'ia3'; known: fff, par_bn, lora, dora"):
        kinds.get("ia3")


def test_dora_and_the_parallel_adapter_are_counted_in_closed_form():
    shape = tiny_base().shape()
    d, layers = shape.hidden_size, shape.num_hidden_layers
    kv = shape.num_key_value_heads * (d // shape.num_attention_heads)
    dims = [(d, d), (d, kv), (d, kv), (d, d), (d, shape.intermediate_size), (d, shape.intermediate_size),
            (shape.intermediate_size, d)]  # fmt: skip
    r = 4  # DoRA: LoRA's r * (in + out) per module, plus one magnitude per output row
    dora = count_adapters(AdapterSpec(dora={"r": r}), shape)
    assert dora.others == {"dora": layers * sum(r * (i + o) + o for i, o in dims)} and dora.trainable > 0
    b = 8  # the parallel adapter: down (d x b + b) and up (b x d + d) per chosen layer
    par = count_adapters(AdapterSpec(par_bn={"bottleneck": b, "layers": "1-2"}), shape)
    assert par.others == {"par_bn": 2 * (2 * d * b + b + d)} and par.fff == par.lora == 0
    both = count_adapters(AdapterSpec(fff={"n_sublayers": 1, "width": 8, "layers": "1"}, lora={"r": 2},
                                      par_bn={"bottleneck": b, "layers": "1-2"}), shape)  # fmt: skip
    assert both.counts["par_bn"] == par.others["par_bn"] and both.trainable == sum(both.counts.values())


def test_dora_and_lora_are_refused_together_and_bad_sizes_name_their_field():
    with pytest.raises(ConfigError, match="model.lora: cannot share a model with model.dora"):
        AdapterSpec(lora={"r": 4}, dora={"r": 4})
    with pytest.raises(ConfigError, match="model.dora.r: must be a positive int"):
        AdapterSpec(dora={"r": 0})
    with pytest.raises(ConfigError, match="model.par_bn.activation: unknown value 'swish'"):
        AdapterSpec(par_bn={"activation": "swish"})
    with pytest.raises(ConfigError, match="model.par_bn.layers"):
        AdapterSpec(par_bn={"layers": "9"}).check(tiny_base().shape())
    with pytest.raises(ConfigError, match="names adapter kind 'ia3', which this installation does not have"):
        AdapterSpec.from_dict({"fff": None, "lora": None, "ia3": {"r": 1}})


def test_the_parallel_adapter_starts_as_the_base_model_and_dora_as_its_weights():
    from fff_lightning.loading import load_model

    base = tiny_base()
    x = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, _, _ = load_model(base, AdapterSpec(lora={"r": 2, "layers": "0"}), seed=1)
    with torch.no_grad():
        ref = plain(input_ids=x).logits  # LoRA's B starts at zero: the base model's logits
        for spec in (AdapterSpec(par_bn={"bottleneck": 8}), AdapterSpec(dora={"r": 4})):
            model, _, _ = load_model(base, spec, seed=1)
            assert torch.allclose(model(input_ids=x).logits, ref, atol=1e-5), spec.legend()


@pytest.mark.slow
def test_dora_and_the_parallel_adapter_train_save_reload_and_are_reported(tmp_path):
    from fff_lightning.lightning_cli import run_lightning
    from fff_lightning.loading import build_from_adapter
    from fff_lightning.report import main as report_main

    x = torch.randint(3, 32000, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = []
    for extra in (
        [*NO_FFF_LORA, "--model.dora.r", "4"],
        ["--model.lora", "null", "--model.par_bn.bottleneck", "8", "--model.par_bn.layers", "1-3"],  # FFF beside it
    ):
        cli = run_lightning(
            quick_args(
                tmp_path, "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3", *extra, steps=3
            )
        )
        run = Path(cli.trainer.log_dir)
        spec = cli.model.adapters
        saved = json.loads((run / "adapter" / "fff_adapter_config.json").read_text())
        kind = "dora" if spec.dora else "par_bn"
        assert saved[kind] is not None and saved["parameters"][kind] > 0
        trained = [p for n, p in cli.model.model.named_parameters() if spec.kind_of(n) == kind]
        assert trained and all(p.requires_grad for p in trained)
        assert any(p.abs().sum() > 0 for n, p in cli.model.model.named_parameters() if ".up." in n or "lora_B" in n)
        model, _, _ = build_from_adapter(cli.model.base, run / "adapter")
        with torch.no_grad():
            assert torch.allclose(model(input_ids=x).logits, cli.model.model(input_ids=x).logits, atol=1e-5)
        runs.append(run)
    names = [r.name for r in runs]
    assert names == ["dora-r4", "fff-[32]-2-[gelu_new]-[up_proj]+par_bn-b8"]
    report_main([*map(str, runs), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "validation.md").read_text()
    assert all(n in table for n in names)


def test_budget_matches_dora_and_the_parallel_adapter_to_a_budget(capsys):
    from fff_lightning.budget_cli import main

    target = count_adapters(AdapterSpec(fff={"n_sublayers": 2, "width": 32, "layers": "1-2"}, lora={"r": 8}),
                            tiny_base().shape()).trainable  # fmt: skip
    for kind, field in (("dora", "dora.r"), ("par_bn", "par_bn.bottleneck"), ("lora_rank", "lora.r")):
        main(["--config", QUICK, "--match", kind, "--json"])  # target: the tiny run's own budget
        out = json.loads(capsys.readouterr().out)
        assert out["trainable"] == target and out["match"]["field"] == field
        assert abs(out["match"]["difference"]) / target < 0.1, out["match"]
    main(["--config", QUICK, *NO_FFF_LORA, "--model.par_bn.bottleneck", "16"])
    assert "parallel bottleneck" in capsys.readouterr().out


def test_a_sweep_compares_arms_of_any_kinds(tmp_path, capsys):
    grid = {"sweep": {"experiment": "kinds", "configs": [QUICK], "seeds": [1, 2],
                      "arms": {"fff": {}, "dora": {"set": {"model.fff": None, "model.lora": None, "model.dora.r": 4}},
                               "par_bn": {"set": {"model.fff": None, "model.lora": None,
                                                  "model.par_bn.bottleneck": 16}}}}}  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    from fff_lightning.sweep import main as sweep_main

    sweep_main(["--config", str(path), "--logs_dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    for name in ("dora-dora-r4-seed=1", "par_bn-par_bn-b16-seed=2", "fff-lora-[32]-2-[gelu_new]-[up_proj]-seed=1"):
        assert name in out, out


MY_KIND = '''
"""A third-party adapter kind in one module: a learnable gain on each chosen MLP's output."""
from dataclasses import dataclass

from fff_lightning.checks import parse_layers
from fff_lightning.kinds import AdapterKind, register


@dataclass
class GainConfig:
    """A gain per hidden channel on the MLP's output.

    Attributes:
        layers: decoder layers whose MLP gets one.
    """

    layers: str = "all"


@register
class GainKind(AdapterKind):
    name = "gain"
    config = GainConfig
    title = "gain"

    def owns(self, param):
        return param.endswith(".mlp_gain")

    def inject(self, model, cfg, shape, ctx):
        import torch

        from fff_lightning.fff import decoder_layers

        layers = decoder_layers(model)
        for i in parse_layers(cfg.layers, len(layers), "model.gain.layers"):
            mlp = layers[i].mlp
            mlp.mlp_gain = torch.nn.Parameter(torch.ones(shape.hidden_size, device=mlp.down_proj.weight.device))
            mlp.register_forward_hook(lambda m, args, out: out * m.mlp_gain)
        return model

    def legend(self, cfg):
        return "gain"
'''


@pytest.mark.slow
def test_a_kind_from_another_package_is_one_module_and_an_entry_point(tmp_path):
    (tmp_path / "my_gain.py").write_text(textwrap.dedent(MY_KIND))
    info = tmp_path / "my_gain-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-gain\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fff_lightning.adapter_kinds]\ngain = my_gain\n")
    env = {**ENV, "PYTHONPATH": f"{tmp_path}:{ENV['PYTHONPATH']}"}
    args = quick_args(tmp_path / "logs", *NO_FFF_LORA, "--model.gain.layers", "1-2", "--trainer.limit_val_batches",
                      "1", steps=2)  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "fff_lightning", *args], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = tmp_path / "logs" / "tiny" / "gain"
    saved = json.loads((run / "adapter" / "fff_adapter_config.json").read_text())
    assert saved["gain"] == {"layers": "1-2"} and saved["parameters"]["gain"] == 2 * 64
    assert "parameter budget: gain 128 | trainable 128" in out.stdout  # the guard counts it like any kind


def test_a_grids_lora_baseline_is_lora_alone_whatever_kinds_the_run_has(tmp_path):
    from fff_lightning.run_config import describe_run
    from fff_lightning.sweep import expand, load_grid

    grid = {"sweep": {"experiment": "b", "configs": [QUICK], "baselines": "lora_rank",
                      "set": {"model.par_bn.bottleneck": 8}, "grid": {"model.fff.width": [16]}}}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    runs = expand(load_grid(tmp_path / "grid.yaml"))
    run, baseline = runs
    assert run.name.endswith("+par_bn-b8") and baseline.baseline_of == run.name
    spec = describe_run(QUICK, overrides=baseline.overrides).model.adapters
    assert list(spec.configs) == ["lora"] and spec.lora.rank == int(baseline.name.removeprefix("lora-r"))
    assert baseline.trainable == count_adapters(spec, tiny_base().shape()).trainable
    assert [o for o in baseline.overrides if o.endswith("=null")] == ["--model.fff=null", "--model.par_bn=null"]


def test_what_cannot_work_with_a_kind_is_one_line(tmp_path):
    from fff_lightning.adapters import save_adapters
    from fff_lightning.backends.unsloth import Unsloth
    from fff_lightning.budget_cli import main as budget_main
    from fff_lightning.loading import load_model

    with pytest.raises(ConfigError, match="model.par_bn: hooks the MLP module, which Unsloth's fast generation"):
        Unsloth().check_adapters(AdapterSpec(par_bn={"bottleneck": 4}))
    Unsloth().check_adapters(AdapterSpec(dora={"r": 4}))  # DoRA goes through plain PEFT there
    with pytest.raises(ConfigError, match="--memory: the memory plan does not model the par_bn adapter"):
        budget_main(["--config", "step2", "--model.par_bn.bottleneck", "8", "--memory", "8"])
    spec = AdapterSpec(lora={"r": 2}, par_bn={"bottleneck": 4, "layers": "1"})
    model, _, _ = load_model(tiny_base(), spec, seed=1)
    with pytest.raises(ConfigError, match="the model also carries par_bn adapters, which fff/lora do not describe"):
        save_adapters(model, tmp_path / "a", None, spec.lora)  # the old call would write a folder it cannot reload
    assert not (tmp_path / "a").exists()


def test_a_budget_target_is_read_for_its_adapters_as_fit_reads_them(tmp_path):
    from fff_lightning.budget import config_budget

    shape = tiny_base().shape()
    plain = tmp_path / "plain.yaml"
    plain.write_text("model:\n  fff: {n_sublayers: 1, width: 8, layers: '1'}\n  lora: null\n")
    typed = tmp_path / "typed.yaml"  # YAML alone reads 1e-2 as a string; the parser types it as fit does
    typed.write_text(
        "model:\n  base: {backend: tiny}\n  fff: {n_sublayers: 1, width: 8, layers: '1', init_std: 1e-2}\n"
    )
    expected = count_adapters(AdapterSpec(fff={"n_sublayers": 1, "width": 8, "layers": "1"}), shape).trainable
    assert config_budget(str(plain), shape, "t") == config_budget(str(typed), shape, "t") == expected
