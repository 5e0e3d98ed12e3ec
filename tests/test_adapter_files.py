"""Saving the adapters alone and loading them onto a fresh base model."""

import json

import pytest
import torch

from fff_lightning.adapters import CONFIG_NAME, WEIGHTS_NAME, count_parameters, save_adapters
from fff_lightning.errors import ConfigError
from fff_lightning.loading import build_from_adapter, build_model
from fff_lightning.spec import FFFConfig, LoRAConfig


def trained(tiny, tokens, fff, lora):
    model, _, _ = build_model(tiny, fff, lora, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("with_lora", [False, True])
def test_round_trip_gives_identical_logits(tiny, tokens, tmp_path, with_lora):
    fff = FFFConfig(n_sublayers=2, width=[4, 8], activation=["silu", "gelu_new"], layers="1-3")
    lora = LoRAConfig(r=2) if with_lora else None
    model = trained(tiny, tokens, fff, lora)
    save_adapters(model, tmp_path, fff, lora)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["fff"]["width"] == [4, 8] and (cfg["lora"] is not None) == with_lora
    assert cfg["parameters"]["trainable"] == count_parameters(model)["trainable"]

    fresh, _, _ = build_from_adapter(tiny, tmp_path, seed=123)  # another seed: every value must come from the file
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=tokens).logits, model(input_ids=tokens).logits, rtol=0, atol=0)


def test_file_holds_adapters_only(tiny, tokens, tmp_path):
    from safetensors.torch import load_file

    fff, lora = FFFConfig(n_sublayers=1, width=8, layers=[0]), LoRAConfig(r=2, target_modules=["v_proj"])
    model = trained(tiny, tokens, fff, lora)
    save_adapters(model, tmp_path, fff, lora)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert sum(t.numel() for t in saved.values()) == count_parameters(model)["trainable"]
    assert all(".fff_blocks." in k or ".lora_" in k for k in saved)
    assert (tmp_path / WEIGHTS_NAME).stat().st_size < 4 * count_parameters(model)["trainable"] + 64 * 1024


def test_mismatched_adapter_file_is_refused_with_the_reason(tiny, tokens, tmp_path):
    from fff_lightning.adapters import load_adapters

    model = trained(tiny, tokens, FFFConfig(n_sublayers=1, width=8), None)
    save_adapters(model, tmp_path, FFFConfig(n_sublayers=1, width=8), None)
    # The folder says which adapters it holds; configs given beside it must be the same.
    for fff, lora in ((FFFConfig(n_sublayers=1, width=16), None), (None, LoRAConfig(r=2))):
        with pytest.raises(ConfigError, match="differs from the adapter folder's"):
            build_model(tiny, fff, lora, adapter_path=tmp_path)
    # Weights that do not fit the model they are loaded into are named.
    wider, _, _ = build_model(tiny, FFFConfig(n_sublayers=1, width=16))
    with pytest.raises(ConfigError, match=r"12 shape mismatch.*d_proj.weight: file \(64, 8\), model \(64, 16\)"):
        load_adapters(wider, tmp_path)
    both, _, _ = build_model(tiny, FFFConfig(n_sublayers=1, width=8), LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="missing from the file"):
        load_adapters(both, tmp_path)
    lora_only, _, _ = build_model(tiny, None, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="not in the model"):
        load_adapters(lora_only, tmp_path)
    with pytest.raises(ConfigError, match="is not an adapter folder"):
        build_from_adapter(tiny, tmp_path / "nowhere")
