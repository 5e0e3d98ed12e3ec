"""The FFF block, its injection and its config checks, on the tiny random Mistral."""

import pytest
import torch
from torch import nn

from fff_lightning.backends.tiny import tiny_model_dir
from fff_lightning.errors import ConfigError
from fff_lightning.fff import FFFLinear, FFFSublayer
from fff_lightning.loading import build_model
from fff_lightning.spec import FFFConfig, parse_layers


def base_logits(tiny, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tiny), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_sublayer_matches_the_research_formula():
    torch.manual_seed(0)
    layer = FFFSublayer(dim=16, width=8, activation="gelu_new", eps=1e-6)
    layer.reset_parameters("normal", 0.02)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(2, 5, 16)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * layer.norm.weight
    gelu_new = nn.GELU(approximate="tanh")
    expected = (gelu_new(n @ layer.g_proj.weight.T) * (n @ layer.u_proj.weight.T)) @ layer.d_proj.weight.T
    torch.testing.assert_close(layer(h), expected)


def test_wrapper_applies_residual_stack_then_projection_and_keeps_input_dtype():
    torch.manual_seed(0)
    proj = nn.Linear(16, 32, bias=False)
    cfg = FFFConfig(n_sublayers=2, width=[4, 8], activation=["silu", "sigmoid"], init="normal", dtype="bfloat16")
    wrapper = FFFLinear(proj, 16, cfg, eps=1e-6)
    assert all(p.dtype == torch.bfloat16 for p in wrapper.fff_blocks.parameters())
    x = torch.randn(3, 16)
    out = wrapper(x)
    assert out.dtype == torch.float32
    h = x.to(torch.bfloat16)
    for block in wrapper.fff_blocks:
        h = h + block(h)
    torch.testing.assert_close(out, proj(h.float()))


@pytest.mark.parametrize(
    "cfg",
    [
        FFFConfig(n_sublayers=1, width=8, activation="silu", layers="all"),
        FFFConfig(n_sublayers=3, width=[4, 8, 16], activation=["silu", "gelu_new", "laplace"], layers="1-2"),
        FFFConfig(n_sublayers=2, width=5, targets=["up_proj", "gate_proj"], layers=[0, 3]),
    ],
)
def test_parameter_count_equals_closed_form(tiny, cfg):
    from fff_lightning.adapters import count_parameters

    model, _, shape = build_model(tiny, cfg)
    d, n_layers = shape.hidden_size, shape.num_hidden_layers
    per_stack = sum(3 * d * w + d for w in cfg.widths())
    n_stacks = len(cfg.targets) * len(parse_layers(cfg.layers, n_layers))
    assert count_parameters(model)["fff"] == per_stack * n_stacks == cfg.n_params(d, n_layers)
    assert count_parameters(model)["lora"] == 0


def test_identity_init_reproduces_the_base_model(tiny, tokens):
    cfg = FFFConfig(n_sublayers=3, width=8, targets=["up_proj", "gate_proj"], init="identity")
    model, _, _ = build_model(tiny, cfg, seed=1)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    torch.testing.assert_close(logits, base_logits(tiny, tokens), rtol=0, atol=0)


def test_normal_init_changes_the_output_at_step_0(tiny, tokens):
    model, _, _ = build_model(tiny, FFFConfig(n_sublayers=2, width=8, init="normal", init_std=0.2), seed=1)
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    assert not torch.allclose(logits, base_logits(tiny, tokens))


def test_only_the_targeted_projection_sees_the_transformed_input(tiny, tokens):
    model, _, _ = build_model(tiny, FFFConfig(n_sublayers=1, width=8, init="normal", init_std=0.5, layers=[1]))
    mlp = model.model.layers[1].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("mlp", args[0]))
    mlp.gate_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("gate", args[0]))
    mlp.up_proj.base_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("up", args[0]))
    with torch.no_grad():
        model(input_ids=tokens)
    assert torch.equal(seen["gate"], seen["mlp"])
    assert not torch.allclose(seen["up"], seen["mlp"])


def test_same_seed_same_adapter_weights(tiny):
    cfg = FFFConfig(n_sublayers=1, width=8, init="normal")
    a, _, _ = build_model(tiny, cfg, seed=3)
    b, _, _ = build_model(tiny, cfg, seed=3)
    c, _, _ = build_model(tiny, cfg, seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.fff_blocks[0].g_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("all", 4, [0, 1, 2, 3]),
        ("13-19", 32, list(range(13, 20))),
        ("0,2,5-7", 8, [0, 2, 5, 6, 7]),
        ([3, 1], 4, [1, 3]),
        (2, 4, [2]),
    ],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        (dict(activation="swishy"), "model.fff.activation", "gelu_new"),
        (dict(targets=["down_proj"]), "model.fff.targets", "up_proj, gate_proj"),
        (dict(n_sublayers=3, width=[8, 8]), "model.fff.width", "2 widths for 3 sub-layers"),
        (dict(n_sublayers=2, activation=["silu"]), "model.fff.activation", "1 activations for 2 sub-layers"),
        (dict(n_sublayers=0), "model.fff.n_sublayers", "positive"),
        (dict(width=-4), "model.fff.width", "positive"),
        (dict(width=[8, 0], n_sublayers=2), "model.fff.width", "positive"),
        (dict(layers="13-x"), "model.fff.layers", "cannot read"),
        (dict(layers="9-3"), "model.fff.layers", "backwards"),
        (dict(init="zeros"), "model.fff.init", "normal, identity"),
        (dict(dtype="int8"), "model.fff.dtype", "float32, bfloat16, float16"),
    ],
)
def test_bad_fff_config_names_the_field_and_what_is_allowed(kwargs, field, words):
    with pytest.raises(ConfigError) as e:
        FFFConfig(**kwargs)
    assert e.value.field == field and words in e.value.message


def test_layer_beyond_the_model_is_refused_before_loading(tiny, monkeypatch):
    import fff_lightning.backends.hf as hf_backend

    monkeypatch.setattr(hf_backend, "load_pretrained", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(ConfigError, match=r"fff.layers: layer\(s\) \[4, 5\] do not exist: the model has 4 layers"):
        build_model(tiny, FFFConfig(layers="2-5"))


@pytest.mark.parametrize("tokens", [7, 13])  # chunks of unequal sizes
def test_recomputed_stack_gives_the_same_output_and_gradients(tokens):
    """The memory plan's "FFF stacks recomputed": only the stack's input is kept for backward, the stack is rebuilt
    in token chunks; outputs and every gradient equal the plain stack's."""
    torch.manual_seed(0)
    cfg = FFFConfig(n_sublayers=3, width=8, activation="gelu_new", init="normal")
    wrapper = FFFLinear(nn.Linear(16, 24, bias=False), 16, cfg, eps=1e-6)
    x = torch.randn(2, tokens, 16, requires_grad=True)
    runs = []
    for recompute in (False, True):
        wrapper.recompute = recompute
        wrapper.zero_grad()
        x.grad = None
        out = wrapper(x)
        (out.square().sum()).backward()
        runs.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in wrapper.fff_blocks.parameters()]))
    (o1, g1, p1), (o2, g2, p2) = runs
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    for a, b in zip(p2, p1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradients to build: the plain stack, nothing recomputed
        torch.testing.assert_close(wrapper(x), o1, rtol=1e-5, atol=1e-6)
