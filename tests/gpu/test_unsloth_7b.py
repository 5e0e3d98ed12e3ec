"""Mistral-7B (random weights) in 4-bit through the unsloth backend with the step-2 adapters. GPU only.

Run: ``python -m pytest -m gpu -s tests/gpu``; figures go into docs/gpu.md with the command that produced them.
"""

import time

import pytest
import torch

from fff_lightning.adapters import count_parameters
from fff_lightning.loading import BaseModelConfig, build_model
from fff_lightning.run_config import describe_run

pytestmark = pytest.mark.gpu


def test_step2_adapters_on_unsloth_4bit(random_mistral_7b, capfd):
    spec = describe_run("configs/step2.yaml").model.adapters
    base = BaseModelConfig(backend="unsloth", name_or_path=str(random_mistral_7b), max_seq_length=2048)
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer, shape = build_model(base, spec.fff, spec.lora, seed=12)
    loaded = capfd.readouterr()
    print(loaded.out[-4000:], loaded.err[-4000:])  # what Unsloth said about the layers it patched

    counts = count_parameters(model)
    assert counts["fff"] == 66_232_320 and counts["lora"] == 62_914_560
    layers = model.base_model.model.model.layers
    assert all(type(layers[i].mlp.up_proj).__name__ == "FFFLinear" for i in range(13, 20))

    model.train()
    ids = torch.randint(3, 32000, (2, 2048), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        fff_grad = layers[13].mlp.up_proj.fff_blocks[0].d_proj.weight.grad
        lora_grad = layers[13].mlp.up_proj.base_proj.lora_A["default"].weight.grad
        assert fff_grad is not None and fff_grad.abs().sum() > 0
        assert lora_grad is not None
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids[:, :256]).logits
    assert torch.isfinite(logits.float()).all()
    peak = torch.cuda.max_memory_allocated() / 2**30
    step = sorted(times[1:])[len(times[1:]) // 2]
    print(
        f"\nRESULT unsloth 4-bit Mistral-7B + step2 adapters: trainable {counts['trainable']:,}; "
        f"batch 2x2048 train step median {step:.2f} s ({2 * 2048 / step:,.0f} tokens/s) over steps 2-4; "
        f"peak allocated {peak:.1f} GiB"
    )
