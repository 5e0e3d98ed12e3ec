"""What makes `fit` lean and fast, checked on the tiny model on a CPU: training mode and checkpointing in effect,
padding-free packing that changes no loss, the compiled FFF stack, the fused-MLP wiring, and the bench."""

import json
import sys
import types
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import run_cli

from fff_lightning.data.collate import IGNORE, PackCollator, PadCollator
from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.data.sampling import pack_batches
from fff_lightning.data.sources import SourceConfig
from fff_lightning.fff import FFFLinear, decoder_layers
from fff_lightning.loading import BaseModelConfig, build_model
from fff_lightning.module import FFFModule
from fff_lightning.spec import FFFConfig, LoRAConfig

ROOT = Path(__file__).parent.parent


def sources(**kw):
    return [
        SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=16, val_rows=6),
        SourceConfig("ultrachat", "bundled:ultrachat", "ultrachat", train_rows=8, val_rows=4),
        SourceConfig("artificial_thinker", "bundled:artificial_thinker", "artificial_thinker", val_rows=8, **kw),
    ]


def data(tmp_path, **kw):
    kw.setdefault("batch_size", 4)
    return FFFDataModule(sources(), max_seq_length=128, cache_dir=str(tmp_path / "cache"), **kw)


def module(**base):
    cfg = BaseModelConfig(backend="tiny", load_in_4bit=False, dtype="float32", max_seq_length=128, **base)
    return FFFModule(cfg, FFFConfig(n_sublayers=2, width=8, layers="1-2"), LoRAConfig(r=4), lr=1e-3, seed=3)


def trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


class Probe(L.Callback):
    """During each training step: which modules are in eval mode, and how many decoder layers recompute."""

    def __init__(self):
        self.eval_modules, self.checkpointed = [], []
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        for layer in decoder_layers(pl_module.model):
            inner = layer._gradient_checkpointing_func if hasattr(layer, "_gradient_checkpointing_func") else None
            if inner is not None:

                def counted(*a, _inner=inner, **k):
                    self.calls += 1
                    return _inner(*a, **k)

                layer._gradient_checkpointing_func = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls = 0

    def on_before_backward(self, trainer, pl_module, loss):
        self.eval_modules.append([n for n, m in pl_module.named_modules() if not m.training])
        self.checkpointed.append(self.calls)


@pytest.mark.parametrize("layers, expected", [(None, 4), (2, 2)])
def test_training_steps_run_in_training_mode_with_checkpointing_in_effect(tmp_path, layers, expected):
    probe = Probe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(max_steps=3, callbacks=[probe], limit_val_batches=2, val_check_interval=2).fit(
            module(gradient_checkpointing=True, checkpoint_layers=layers), data(tmp_path)
        )
    assert len(probe.eval_modules) == 3 and probe.eval_modules == [[], [], []]  # step 3 follows a validation
    assert probe.checkpointed == [expected] * 3  # tiny has 4 decoder layers; each recomputed one is counted
    assert not [w for w in caught if "eval mode" in str(w.message)]


def test_checkpoint_layers_is_checked():
    from fff_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="base.checkpoint_layers"):
        BaseModelConfig(checkpoint_layers=-1)


def test_pack_collator_keeps_documents_apart():
    rows = [
        {"input_ids": [1, 5, 6], "labels": [1, 5, 6], "source": 0},
        {"input_ids": [1, 7], "labels": [IGNORE, 7], "source": 1},
    ]
    b = PackCollator()(rows)
    assert b["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[IGNORE, 5, 6, IGNORE, 7]]  # no sample scores the next one's first token
    assert b["packed_seq_lengths"].tolist() == [3, 2] and b["num_tokens"] == 5 and b["num_samples"] == 2
    assert "attention_mask" not in b


def test_pack_batches_fills_the_budget_and_uses_every_sample_once():
    import random

    lengths = [random.Random(i).randint(5, 100) for i in range(500)]
    plan = pack_batches(lengths, 256, seed=1, window=128)
    assert sorted(i for b in plan for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in plan)
    assert sum(lengths) / (len(plan) * 256) > 0.95
    assert plan == pack_batches(lengths, 256, seed=1, window=128) != pack_batches(lengths, 256, seed=2, window=128)
    with pytest.raises(ValueError):
        pack_batches([300], 256)


def test_a_packed_row_scores_every_token_as_the_unpacked_batch_does(tiny):
    model, _, _ = build_model(tiny, FFFConfig(n_sublayers=1, width=8, init="normal"), LoRAConfig(r=4), seed=0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (7, 12, 5, 9):
        ids = torch.randint(3, 32000, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "source": 0})

    def token_losses(batch):
        kw = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], use_cache=False, **kw).logits
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        return ce[labels != IGNORE]

    packed, padded = token_losses(PackCollator()(rows)), token_losses(PadCollator(0)(rows))
    assert packed.shape == padded.shape == (sum(len(r["input_ids"]) - 1 for r in rows),)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_packed_validation_table_equals_the_padded_one(tmp_path):
    tables = {}
    for packing in (False, True):
        m = module(gradient_checkpointing=False)
        d = data(tmp_path, packing=packing, tokens_per_batch=512 if packing else None)
        trainer().validate(m, d, verbose=False)
        tables[packing] = m.last_results
        assert d.summary[0]["padding_share"] == 0.0 if packing else d.summary[1]["padding_share"] > 0.1
    for a, b in zip(tables[False], tables[True], strict=True):
        assert (a["dataset"], a["rows"], a["tokens"]) == (b["dataset"], b["rows"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)


def test_packed_training_takes_fewer_fuller_steps(tmp_path):
    padded, packed = data(tmp_path), data(tmp_path, packing=True)
    padded.setup("fit")
    packed.setup("fit")
    assert packed.train_batches_per_epoch() < padded.train_batches_per_epoch()
    seen = [i for b in packed.train_batches for i in b]
    assert sorted(seen) == list(range(len(packed.train_set)))  # every sample once per epoch
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["num_tokens"] <= packed.tokens_per_batch == 4 * 128


def test_tokens_per_batch_must_fit_a_sample(tmp_path):
    from fff_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="data.tokens_per_batch"):
        data(tmp_path, packing=True, tokens_per_batch=64)


@pytest.mark.slow
def test_compiled_fff_stack_equals_the_eager_one():
    torch.manual_seed(0)
    cfg = FFFConfig(n_sublayers=2, width=[8, 4], activation=["gelu_new", "silu"], init="normal")
    wrapper = FFFLinear(torch.nn.Linear(16, 24, bias=False), 16, cfg, eps=1e-6)
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = []
    for compiled in (False, True):
        wrapper.compiled = compiled
        wrapper.zero_grad()
        x.grad = None
        y = wrapper(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), [p.grad.clone() for p in wrapper.fff_blocks.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp0, gp1, strict=True):
        torch.testing.assert_close(b, a)


def test_fused_mlp_feeds_each_projection_its_own_input(tiny, monkeypatch):
    """The fused forward of an FFF-carrying MLP, with a reference LoRA_W in place of Unsloth's GPU kernel, gives
    PEFT's outputs and gradients for FFF on up_proj, on gate_proj and on both."""
    from fff_lightning.backends.unsloth_mlp import fuse_fff_mlps

    class LoRAW(torch.autograd.Function):  # Unsloth's LoRA_W contract: X @ W^T + S * X @ A^T @ B^T
        @staticmethod
        def forward(ctx, X, W, W_quant, A, B, S):
            ctx.save_for_backward(X, W, A, B)
            ctx.S = S
            return X @ W.t() + S * (X @ A.t()) @ B.t()

        @staticmethod
        def backward(ctx, dY):
            X, W, A, B = ctx.saved_tensors
            x, dy = X.reshape(-1, X.shape[-1]), dY.reshape(-1, dY.shape[-1])
            dA = ctx.S * (dy @ B).t() @ x
            dB = ctx.S * dy.t() @ (x @ A.t())
            return dY @ W + ctx.S * (dY @ B) @ A, None, None, dA, dB, None

    def params(proj):
        return (
            proj.base_layer.weight,
            None,
            proj.lora_A["default"].weight,
            proj.lora_B["default"].weight,
            proj.scaling["default"],
        )

    fast_lora = types.SimpleNamespace(LoRA_W=LoRAW, get_lora_parameters=params)
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    monkeypatch.setitem(sys.modules, "unsloth.kernels", types.ModuleType("unsloth.kernels"))
    monkeypatch.setitem(sys.modules, "unsloth.kernels.fast_lora", fast_lora)
    ids = torch.randint(3, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    for targets in (["up_proj"], ["gate_proj"], ["up_proj", "gate_proj"]):
        fff = FFFConfig(n_sublayers=2, width=8, layers="1-2", init="normal", targets=targets)
        model, _, _ = build_model(tiny, fff, LoRAConfig(r=4), seed=0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        runs = []
        for fuse in (False, True):
            if fuse:
                assert fuse_fff_mlps(model) == [1, 2]
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (l0, g0), (l1, g1) = runs
        torch.testing.assert_close(l1, l0)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5)


def test_deterministic_seed_leaves_cublas_alone_unless_asked(monkeypatch):
    from fff_lightning.callbacks import DeterministicSeed

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    DeterministicSeed(12)
    import os

    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


@pytest.mark.slow
def test_bench_smoke_runs_every_code_path_on_cpu(tmp_path):
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    cmd = ["bench", "--batch", "2", "--checkpointing", "on", "--steps", "3"]
    cmd += ["--cases", "a,c,d,e,e-auto", "--out", str(out), "--json", str(raw)]
    cmd += [
        "--extra",
        "seg=e-mix-packed:--model.base.packed_attention segments --model.base.gradient_checkpointing false",
    ]
    done = run_cli(cmd, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(raw.read_text())
    assert [r["case"] for r in results] == ["a", "c", "d", "e", "e-auto", "seg"]
    assert all(r["error"] is None and r["tokens_per_s"] > 0 and r["steps"] == 2 for r in results)
    # Each fit row says what its model was loaded with, read from the run: the seg row's own override wins over
    # --checkpointing on; e-auto (max_memory_gib: auto) is the memory plan's row (no GPU here: no plan, no cap).
    ran = {r["case"]: (r["checkpointing"], r["extra"].get("ran")) for r in results}
    assert ran["e"] == (True, "checkpointing on") and ran["seg"] == (True, "checkpointing off")
    assert ran["e-auto"] == (None, "checkpointing on")
    assert [r["extra"]["packed"] for r in results[1:]] == [False] * 4 + [True]
    budget = {r["case"]: r["trainable"] for r in results}
    assert abs(budget["d"] - budget["c"]) / budget["c"] < 0.01  # FFF only, matched to LoRA r16's budget
    text = out.read_text()
    assert "CPU smoke test: figures mean nothing" in text and "| e-auto |" in text
    assert "gradient checkpointing as the memory plan chose" in text and "| seg |" in text
