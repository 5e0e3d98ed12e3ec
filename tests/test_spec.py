"""The run's description (fff_lightning.spec): one owner, checked once, before anything heavy happens."""

import subprocess
import sys
from pathlib import Path

import pytest

from fff_lightning.errors import ConfigError
from fff_lightning.spec import AdapterSpec, BaseModelConfig, FFFConfig, LoRAConfig

ROOT = Path(__file__).parent.parent
QUICK = str(ROOT / "configs" / "tiny.yaml")


def test_the_spec_module_imports_nothing_heavy():
    code = "import sys, fff_lightning.spec; print(sorted(m for m in ('torch', 'transformers', 'peft', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: FFFConfig(dtype="float64"), "model.fff.dtype"),
        (lambda: FFFConfig(init="zeros"), "model.fff.init"),
        (lambda: LoRAConfig(preset="r99"), "model.lora.preset"),
        (lambda: BaseModelConfig(backend="vllm"), "model.base.backend"),
        (lambda: AdapterSpec(None, None), "model"),
    ],
)
def test_python_api_and_cli_refuse_the_same_values_with_the_same_message(make, field, capsys):
    from fff_lightning.cli import main

    with pytest.raises(ConfigError) as api:
        make()
    assert api.value.field == field
    override = {
        "model.fff.dtype": ["--model.fff.dtype", "float64"],
        "model.fff.init": ["--model.fff.init", "zeros"],
        "model.lora.preset": ["--model.lora.preset", "r99"],
        "model.base.backend": ["--model.base.backend", "vllm"],
        "model": ["--model.fff", "null", "--model.lora", "null"],
    }[field]
    with pytest.raises(SystemExit) as exit_:
        main(["budget", "--config", QUICK, *override])
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == f"error: {api.value}"


def test_float16_adapters_are_accepted_by_both():
    assert FFFConfig(dtype="float16").dtype == "float16"


def test_legend_names_every_kind_of_run():
    fff = FFFConfig(n_sublayers=6, width=128, layers="13-19")
    assert AdapterSpec(fff, LoRAConfig(preset="r24")).legend() == "lora-[128]-6-[gelu_new]-[up_proj]"
    assert AdapterSpec(fff, None).legend() == "fff-[128]-6-[gelu_new]-[up_proj]"
    assert AdapterSpec(None, LoRAConfig(preset="r46")).legend() == "lora-r46"


def test_spec_round_trips_through_dicts_checkpoints_and_folders(tiny, tmp_path):
    from fff_lightning.adapters import read_spec, resolve_adapters, save_adapters
    from fff_lightning.loading import build_model

    spec = AdapterSpec(FFFConfig(n_sublayers=1, width=8, layers="1-2"), LoRAConfig(r=4))
    assert AdapterSpec.from_dict(spec.to_dict()) == spec
    assert AdapterSpec.from_checkpoint({"fff_adapters": spec.to_dict()}) == spec
    model, _, _ = build_model(tiny, spec.fff, spec.lora)
    save_adapters(model, tmp_path, spec.fff, spec.lora)
    assert read_spec(tmp_path) == spec
    assert resolve_adapters(None, None, tmp_path) == spec
    with pytest.raises(ConfigError, match="differs from the adapter folder's"):
        resolve_adapters(FFFConfig(n_sublayers=2, width=8), None, tmp_path)
    with pytest.raises(ConfigError, match="names no adapters"):
        AdapterSpec.from_checkpoint({})


def test_meta_count_equals_the_loaded_model(tiny):
    from fff_lightning.adapters import count_adapters, count_parameters
    from fff_lightning.loading import build_model

    spec = AdapterSpec(FFFConfig(n_sublayers=2, width=[8, 4], layers="0,3"), LoRAConfig(r=4, layers="1-2"))
    budget = count_adapters(spec, tiny.shape())
    model, _, _ = build_model(tiny, spec.fff, spec.lora)
    counts = count_parameters(model)
    assert (budget.fff, budget.lora) == (counts["fff"], counts["lora"])


def _fail(*args, **kwargs):
    raise AssertionError("loaded or tokenized before the checks")


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--trainer.callbacks+=fff_lightning.callbacks.ParameterBudget", "--trainer.callbacks.target=1000"],
            "off budget",
        ),
        (["--model.fff.layers", "2-9"], "do not exist"),
    ],
)
def test_every_check_runs_before_any_weight_or_data(tmp_path, monkeypatch, extra, message):
    import fff_lightning.backends.hf as hf_backend
    import fff_lightning.backends.tiny as tiny_backend
    import fff_lightning.data.datamodule as dm
    from fff_lightning.lightning_cli import run_lightning

    monkeypatch.setattr(dm, "prepare_source", _fail)  # tokenizing
    monkeypatch.setattr(hf_backend, "load_pretrained", _fail)  # loading weights
    monkeypatch.setattr(tiny_backend, "tiny_model_dir", _fail)
    args = ["fit", "--config", QUICK, "--logs_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", *extra]
    with pytest.raises(ConfigError, match=message):
        run_lightning(args)


def test_a_fit_resolves_its_adapters_reads_its_shape_and_checks_once(tmp_path, monkeypatch):
    """The run is planned once, before any class exists: the module, the budget guard (its target is another
    config: read for its adapters, no second parser), the loader and the export read the plan."""
    from collections import Counter

    from helpers import quick_args

    from fff_lightning import adapters, lightning_cli, loading, plan, run_config

    calls = Counter()

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(plan, "plan_run", counted(plan, "plan_run"))
    for module in (lightning_cli, loading):
        monkeypatch.setattr(module, "plan_run", plan.plan_run)
    monkeypatch.setattr(adapters, "read_spec", counted(adapters, "read_spec"))
    monkeypatch.setattr(adapters, "check_size", counted(adapters, "check_size"))
    monkeypatch.setattr(BaseModelConfig, "shape", counted(BaseModelConfig, "shape"))
    monkeypatch.setattr(run_config, "describe_run", counted(run_config, "describe_run"))
    guard = ["--trainer.callbacks+=fff_lightning.callbacks.ParameterBudget",
             f"--trainer.callbacks.target={QUICK}", "--trainer.callbacks.tolerance=0.01"]  # fmt: skip
    cli = lightning_cli.run_lightning(quick_args(tmp_path, "--trainer.limit_val_batches", "0", *guard, steps=1))
    assert cli.trainer.global_step == 1 and (tmp_path / "tiny").is_dir()
    assert calls == {"plan_run": 1, "check_size": 1, "shape": 1}, calls
    assert cli.model.plan.run_dir == cli.folder.path  # the run folder is the plan's; the adapters were written there
    assert (cli.folder.path / "adapter" / "fff_adapter_config.json").is_file()
    # and the adapter folder it wrote is read once when another run starts from it
    calls.clear()
    run = next((tmp_path / "tiny").iterdir())
    lightning_cli.run_lightning(["validate", "--config", QUICK, "--model.adapter_path", str(run / "adapter"),
                                 "--trainer.limit_val_batches", "1", "--out_dir", str(tmp_path / "val")])  # fmt: skip
    assert calls == {"plan_run": 1, "check_size": 1, "shape": 1, "read_spec": 1}, calls
