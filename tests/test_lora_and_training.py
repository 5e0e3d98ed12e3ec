"""FFF with LoRA beside it: which parameters train, that both update, and the bitsandbytes 4-bit CPU path."""

import pytest
import torch

from fff_lightning.adapters import count_parameters
from fff_lightning.errors import ConfigError
from fff_lightning.loading import build_model
from fff_lightning.spec import LORA_PRESETS, FFFConfig, LoRAConfig


def grad_names(model):
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_exactly_the_adapter_parameters_get_gradients(tiny, tokens):
    fff = FFFConfig(n_sublayers=1, width=8, layers=[1], init="normal")
    lora = LoRAConfig(r=2, target_modules=["q_proj", "up_proj"], layers=[1])
    model, _, _ = build_model(tiny, fff, lora, seed=0)
    # LoRA's B starts at zero, so A gets no gradient on the first step; give B a value to see both.
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model(input_ids=tokens, labels=tokens).loss.backward()
    p = "base_model.model.model.layers.1."
    expected = {
        *(f"{p}mlp.up_proj.fff_blocks.0.{m}.weight" for m in ("norm", "g_proj", "u_proj", "d_proj")),
        *(f"{p}{m}.lora_{ab}.default.weight" for m in ("self_attn.q_proj", "mlp.up_proj.base_proj") for ab in "AB"),
    }
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert grad_names(model) == expected


def test_lora_on_a_wrapped_projection_sees_fff_output(tiny):
    model, _, _ = build_model(tiny, FFFConfig(n_sublayers=1, width=4, layers=[2]), LoRAConfig(r=2), seed=0)
    up = model.base_model.model.model.layers[2].mlp.up_proj
    assert type(up).__name__ == "FFFLinear" and hasattr(up.base_proj, "lora_A")
    assert hasattr(model.base_model.model.model.layers[1].mlp.up_proj, "lora_A")  # unwrapped layer: plain LoRA


@pytest.mark.parametrize("preset", list(LORA_PRESETS))
def test_lora_presets_and_closed_form_count(tiny, preset):
    r, alpha = LORA_PRESETS[preset]
    cfg = LoRAConfig(preset=preset)
    assert (cfg.rank, cfg.lora_alpha) == (r, alpha)
    model, _, shape = build_model(tiny, None, cfg)
    d, ff, kv = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_key_value_heads * (d := shape.hidden_size) // shape.num_attention_heads,
    )
    per_layer = r * ((d + d) * 2 + (d + kv) * 2 + (d + ff) * 2 + (ff + d))  # q,o ; k,v ; gate,up ; down
    assert count_parameters(model)["lora"] == per_layer * shape.num_hidden_layers
    assert model.peft_config["default"].lora_alpha == alpha


def test_preset_fields_are_overridable():
    cfg = LoRAConfig(preset="lora2", alpha=4, target_modules=["q_proj"])
    assert (cfg.rank, cfg.lora_alpha) == (32, 4)
    assert LoRAConfig(preset="lora", r=8).lora_alpha == 4  # an explicit rank keeps the research's ratio r/2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(preset="huge"), "model.lora.preset"),
        (dict(r=0), "model.lora.r"),
        (dict(target_modules=["lm_head"]), "model.lora.target_modules"),
    ],
)
def test_bad_lora_config(kwargs, field):
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**kwargs)
    assert e.value.field == field


def test_a_run_with_no_adapter_is_refused(tiny):
    with pytest.raises(ConfigError, match="no adapter configured"):
        build_model(tiny, None, None)


def train_steps(model, tokens, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_fff_and_lora_both_update(tiny, tokens):
    model, _, _ = build_model(tiny, FFFConfig(n_sublayers=2, width=8, init="identity"), LoRAConfig(r=4), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_steps(model, tokens)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".fff_blocks." in n and "d_proj" in n for n in changed)
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert losses[-1] < losses[0]


def test_4bit_cpu_path_trains_and_keeps_gradients_after_an_inference_mode_forward(tiny, tokens):
    from bitsandbytes.nn import Linear4bit

    base = type(tiny)(backend="tiny", load_in_4bit=True, dtype="float32", gradient_checkpointing=True)
    model, _, _ = build_model(base, FFFConfig(n_sublayers=1, width=8, layers="1-2"), LoRAConfig(r=4), seed=0)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * 4
    losses = train_steps(model, tokens, steps=2)
    with torch.inference_mode():  # what Lightning's validation loop does
        model(input_ids=tokens)
    model(input_ids=tokens, labels=tokens).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_b_and_fff = {n for n in trainable if "lora_B" in n or ".fff_blocks." in n}
    assert lora_b_and_fff <= grad_names(model)
    assert any("lora_A" in n for n in grad_names(model))  # B moved off zero during training
    assert losses[1] < losses[0]
