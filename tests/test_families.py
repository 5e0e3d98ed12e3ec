"""The gated-MLP families beyond Mistral, on tiny random models built from their transformers configs (offline, the
Mistral tokenizer: the tests need some tokenizer, the texts are the same), trained through the `hf` backend like any
local model; the shipped shapes of popular checkpoints; the architectures FFF cannot wrap, refused in one line."""

import json
from pathlib import Path

import pytest
from helpers import QUICK, losses, quick_args

from fff_lightning import architectures
from fff_lightning.errors import ConfigError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=32000, max_position_embeddings=512)  # fmt: skip
FAMILIES = {
    "llama": dict(mlp_bias=True, tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=32),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
    "gemma3": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),  # multimodal: a vision tower too
}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)  # fmt: skip


def tiny_model(folder: Path, model_type: str, **extra) -> Path:
    """A random-weight model of ``model_type`` with the offline Mistral tokenizer, saved as a local model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fff_lightning.tokenizer import load_tokenizer, save_tokenizer

    if model_type == "gemma3":  # the language model's sizes in text_config, beside a vision tower's
        config = AutoConfig.for_model(model_type, text_config={**TINY, **extra}, vision_config=VISION,
                                      mm_tokens_per_image=4)  # fmt: skip
    else:
        config = AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(load_tokenizer(None), folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {t: tiny_model(root / t, t, **extra) for t, extra in FAMILIES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fff_and_lora_train_export_and_reload_on_each_family(family, models, tmp_path):
    from fff_lightning.adapters import count_adapters, count_parameters
    from fff_lightning.lightning_cli import run_lightning

    base = ["--model.base.backend", "hf", "--model.base.name_or_path", str(models[family])]
    base += ["--model.base.load_in_4bit", "false", "--model.lr", "0.01"]
    base += ["--trainer.limit_val_batches", "1"]  # one validation batch a dataset: the same for fit and validate
    cli = run_lightning(quick_args(tmp_path, *base, "--trainer.val_check_interval", "4", steps=4))
    run = Path(cli.trainer.log_dir)
    got = losses(run)
    assert got[max(got)] < got[min(got)], got  # the loss falls
    module = cli.model
    budget = count_adapters(module.adapters, module.base_shape())  # counted on the meta device, as `budget` does
    assert budget.trainable == count_parameters(module.model)["trainable"] and budget.fff > 0 and budget.lora > 0
    assert not any("vision" in n for n, p in module.model.named_parameters() if p.requires_grad)
    table = {r["dataset"]: r["loss"] for r in json.loads((run / "validation.json").read_text())}
    again = run_lightning(quick_args(tmp_path, *base, "--model.adapter_path", str(run / "adapter"), steps=4,
                                     command="validate"))  # fmt: skip
    assert {r["dataset"]: r["loss"] for r in again.model.last_results} == pytest.approx(table, rel=1e-5)


def test_shipped_shapes_are_the_published_models_and_budget_reads_them_offline(monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from fff_lightning.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import torch

    for name, published in architectures.PUBLISHED_PARAMETERS.items():
        config = architectures.language_model(architectures.known_shape(name), name)
        with torch.device("meta"):
            total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        assert abs(total - published) / published < 0.01, (name, total, published)
    main(["budget", "--config", "step2", "--model.base.name_or_path", "meta-llama/Llama-3.1-8B", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == 129_146_880  # Llama-3.1-8B's attention and MLP have Mistral-7B's sizes
    main(["budget", "--config", "step2", "--model.base.name_or_path", "Qwen/Qwen3-8B", "--model.fff.layers", "15-21",
          "--json"])  # fmt: skip
    qwen = json.loads(capsys.readouterr().out)
    assert qwen["lora"] == 24 * 75_776 * 36 and qwen["fff"] == 7 * 6 * (3 * 4096 * 128 + 4096)


@pytest.mark.parametrize(
    ("model_type", "extra", "message"),
    [
        ("phi3", {}, "fuses gate and up into one gate_up_proj Linear"),
        ("mixtral", {"num_local_experts": 4}, "mixture-of-experts model (mixtral)"),
        ("qwen3_moe", {"num_experts": 4, "head_dim": 16}, "mixture-of-experts model (qwen3_moe)"),
    ],
)
def test_architectures_fff_cannot_wrap_are_refused_in_one_line_before_loading(model_type, extra, message, tmp_path,
                                                                              capsys):  # fmt: skip
    from transformers import AutoConfig

    from fff_lightning.cli import main

    AutoConfig.for_model(model_type, **{**TINY, **extra}).save_pretrained(tmp_path)  # a config, no weights at all
    with pytest.raises(SystemExit) as e:
        main(["budget", "--config", QUICK, "--model.base.backend", "hf", "--model.base.name_or_path", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
    with pytest.raises(ConfigError, match="supported: mistral, llama"):
        architectures.language_model(AutoConfig.for_model(model_type, **{**TINY, **extra}))


@pytest.mark.slow
def test_the_llama3_configs_chat_format_trains_with_the_loss_on_the_answers(models, tmp_path):
    from fff_lightning.lightning_cli import run_lightning
    from fff_lightning.run_config import describe_run

    template = describe_run("llama3_step2").datamodule.opts.chat_template
    assert "<|start_header_id|>" in template
    args = ["--model.base.backend", "hf", "--model.base.name_or_path", str(models["llama"])]
    args += ["--model.base.load_in_4bit", "false", "--data.text_style", "chat_template", "--data.loss_on", "assistant"]
    cli = run_lightning(quick_args(tmp_path, *args, f"--data.chat_template={template}", steps=4))
    got = losses(Path(cli.trainer.log_dir))
    assert len(got) == 4 and all(v == v for v in got.values())
    rows = cli.datamodule.train_set
    sample = rows[0]
    scored = sum(1 for t in sample["labels"] if t != -100)
    assert 0 < scored < len(sample["input_ids"])  # the answers only
