"""The bench's inputs and its bare training loops: what a hand-written QLoRA or Unsloth script does."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from fff_lightning.spec import ALL_LINEAR


def long_rows(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """A prompt/response jsonl of ``n`` rows of about ``words`` words each (seeded), to fill a sequence."""
    rng = random.Random(seed)
    vocab = "the model adapter layer token train loss value data batch memory speed gated norm width rank".split()
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(words))
            row = {"prompt": f"Summarise note {i}: {text[: len(text) // 2]}", "response": text[len(text) // 2 :]}
            fh.write(json.dumps(row) + "\n")
    return path


def random_mistral_7b(folder: Path, quantized: bool = True) -> Path:
    """A random-weight Mistral-7B (the real shape) and the Mistral tokenizer in ``folder``; with ``quantized``,
    also its bitsandbytes nf4 copy in ``folder/nf4`` (loaded in seconds by every case). Built once; speed and
    memory do not depend on the weights' values (losses do: quote none)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from fff_lightning.backends.hf import nf4_config
    from fff_lightning.tokenizer import load_tokenizer, save_tokenizer

    bf16 = folder / "bf16"
    if not (bf16 / "config.json").exists():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(MistralConfig(), dtype=torch.bfloat16)
        model.save_pretrained(bf16)
        save_tokenizer(load_tokenizer(None), bf16)
        del model
        torch.cuda.empty_cache()
    if not quantized:
        return bf16
    nf4 = folder / "nf4"
    if not (nf4 / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(
            bf16, quantization_config=nf4_config(torch.bfloat16), dtype=torch.bfloat16, device_map={"": 0}
        )
        model.save_pretrained(nf4)
        save_tokenizer(load_tokenizer(None), nf4)
        del model
        torch.cuda.empty_cache()
    return nf4


def bench_loader(tokenizer_dir: str, data: Path, batch: int, seq: int):
    from fff_lightning.data.datamodule import FFFDataModule
    from fff_lightning.data.sources import SourceConfig

    dm = FFFDataModule(
        sources=[SourceConfig("long", str(data), "prompt_response", val_split=None)],
        batch_size=batch,
        max_seq_length=seq,
        tokenizer=tokenizer_dir,
    )
    dm.setup("fit")
    return dm.train_dataloader()


def _cycle(loader):
    while True:
        yield from loader


def bare_loop(model, loader, steps: int, warmup: int, autocast: bool) -> dict:
    """Train ``model``'s trainable parameters for ``steps`` batches the way a hand-written script does."""
    import torch

    from fff_lightning.callbacks.throughput import _Clock

    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=5e-5, weight_decay=0.01)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    clock = _Clock(device)
    model.train()
    marks, tokens = [], []
    batches = _cycle(loader)
    for _ in range(steps):
        marks.append(clock.mark())
        batch = next(batches)
        tokens.append(batch["num_tokens"])
        ids, mask, labels = (batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    marks.append(clock.mark())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    from fff_lightning.callbacks.throughput import peak_memory_gib

    times = [clock.seconds(a, b) for a, b in zip(marks, marks[1:], strict=False)][warmup:]
    toks = tokens[warmup:]
    del opt
    return {
        "tokens_per_s": statistics.median(t / d for t, d in zip(toks, times, strict=True)),
        "mean_tokens_per_s": sum(toks) / sum(times),
        "step_s": statistics.median(times),
        "peak_gib": peak_memory_gib(device),
        "trainable": sum(p.numel() for p in params),
        "steps": len(times),
    }


LORA16 = dict(r=16, lora_alpha=8, lora_dropout=0.0, bias="none")


def load_bare_hf(path: str, cuda: bool):
    """transformers + bitsandbytes nf4 (double quantisation) + PEFT LoRA r16 on all linear modules: QLoRA."""
    import torch
    from peft import LoraConfig, get_peft_model

    from fff_lightning.backends.hf import load_pretrained

    model = load_pretrained(path, True, torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=list(ALL_LINEAR), **LORA16))
    model.config.use_cache = False
    return model


def set_bare_checkpointing(model, on: bool, unsloth: bool) -> None:
    if unsloth:  # Unsloth armed every decoder layer in get_peft_model; turn them on or off
        from transformers.modeling_layers import GradientCheckpointingLayer

        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):
                m.gradient_checkpointing = on
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def load_bare_unsloth(path: str, seq: int):
    """Unsloth's 4-bit load and its LoRA r16 on all linear modules, with its own checkpointing armed."""
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(
        model, target_modules=list(ALL_LINEAR), use_gradient_checkpointing="unsloth", random_state=3407, **LORA16
    )
