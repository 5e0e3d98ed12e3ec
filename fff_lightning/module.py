"""``FFFModule``: the LightningModule around a base model and its FFF/LoRA adapters."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torchmetrics import SumMetric

from fff_lightning.adapters import is_adapter
from fff_lightning.errors import ConfigError
from fff_lightning.fff import FFFConfig
from fff_lightning.loading import BaseModelConfig, build_from_adapter, build_model, resolve_backend
from fff_lightning.lora import LoRAConfig


class FFFModule(L.LightningModule):
    """Train and evaluate FFF and/or LoRA adapters on a frozen (4-bit) base model.

    Validation loss per dataset is a **token-weighted mean cross-entropy**: the sum of every scored token's loss
    over the whole validation set divided by the number of scored tokens, accumulated with torchmetrics (so it is
    exact across batches and devices). Hugging Face's ``eval_loss`` is the mean of per-batch means, which weights
    tokens of short batches more; the two agree only when every batch scores the same number of tokens.

    Args:
        base: the base model and backend.
        fff: the FFF adapter, or ``None``.
        lora: the LoRA adapter, or ``None``.
        adapter_path: start from saved adapters (a folder written by ``save_adapters``); its own JSON config
            decides the adapters; ``fff``/``lora``, if also given, must agree with it.
        optimizer: ``adamw`` (torch), ``adamw_8bit`` or ``paged_adamw_8bit`` (bitsandbytes).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        scheduler: ``linear`` (decay to 0), ``cosine`` (to 0) or ``constant``, each after ``warmup_steps``.
        warmup_steps: linear warm-up steps.
        seed: seeds the adapters' initialisation.
        max_new_tokens: answer length for ``predict``.
    """

    def __init__(
        self,
        base: BaseModelConfig = BaseModelConfig(),  # noqa: B008  (a frozen-by-convention default, never mutated)
        fff: FFFConfig | None = None,
        lora: LoRAConfig | None = None,
        adapter_path: str | None = None,
        optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw",
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: Literal["linear", "cosine", "constant"] = "linear",
        warmup_steps: int = 1,
        seed: int = 12,
        max_new_tokens: int = 128,
    ):
        super().__init__()
        self.base = base
        self.fff, self.lora, self.adapter_path = fff, lora, adapter_path
        if adapter_path is None and fff is None and lora is None:
            raise ConfigError("model", "no adapter configured: give model.fff, model.lora, or both")
        if optimizer not in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            raise ConfigError(
                "model.optimizer", f"unknown optimizer {optimizer!r}; allowed: adamw, adamw_8bit, paged_adamw_8bit"
            )
        if scheduler not in ("linear", "cosine", "constant"):
            raise ConfigError("model.scheduler", f"unknown scheduler {scheduler!r}; allowed: linear, cosine, constant")
        if not lr > 0 or warmup_steps < 0:
            raise ConfigError("model.lr", "lr must be > 0 and warmup_steps >= 0")
        self.optim = dict(name=optimizer, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.sched = dict(name=scheduler, warmup=warmup_steps)
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        # The init arguments themselves (dataclasses as dicts), so LightningCLI can re-read them from a checkpoint.
        self.save_hyperparameters(
            {
                "base": asdict(base),
                "fff": asdict(fff) if fff else None,
                "lora": asdict(lora) if lora else None,
                "adapter_path": adapter_path,
                "optimizer": optimizer,
                "lr": lr,
                "weight_decay": weight_decay,
                "betas": list(betas),
                "scheduler": scheduler,
                "warmup_steps": warmup_steps,
                "seed": seed,
                "max_new_tokens": max_new_tokens,
            }
        )
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        self.model = None
        self.backend = resolve_backend(base.backend)
        self.val_names: list[str] = []

    # -- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.adapter_path is not None:
            from fff_lightning.adapters import read_adapter_config

            saved = read_adapter_config(self.adapter_path)
            for name, given in (("fff", self.fff), ("lora", self.lora)):
                if given is not None and asdict(given) != saved.get(name):
                    raise ConfigError(
                        f"model.{name}",
                        f"differs from the adapter folder's ({saved.get(name)}); leave it out or match it",
                    )
            self.fff = FFFConfig(**saved["fff"]) if saved.get("fff") else None
            self.lora = LoRAConfig(**saved["lora"]) if saved.get("lora") else None
            self.model, self.tokenizer, self.shape = build_from_adapter(self.base, self.adapter_path, seed=self.seed)
        else:
            self.model, self.tokenizer, self.shape = build_model(self.base, self.fff, self.lora, seed=self.seed)
        # from_pretrained leaves the base model in eval mode, Lightning keeps each module's mode when fit starts,
        # and transformers and Unsloth checkpoint (and drop padding masks) only in training mode: train it.
        # Lightning's own loops put it in eval mode for validation and back afterwards.
        self.model.train()

    # -- checkpoints: adapters only ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if is_adapter(k)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fff_adapters"] = {
            "fff": asdict(self.fff) if self.fff else None,
            "lora": asdict(self.lora) if self.lora else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        if expected != got:
            missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
            shapes = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
            raise ConfigError(
                "ckpt_path",
                f"checkpoint does not match the configured adapters: {len(missing)} missing (e.g. {missing[:1]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]}), {len(shapes)} of another shape "
                f"(e.g. {shapes[:1]})",
            )

    # -- steps -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        # Padded batches carry an attention mask; packed ones carry position ids that restart at each sample
        # (transformers derives a block-diagonal mask from them) and the samples' lengths (Unsloth reads those).
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        if "packed_seq_lengths" in batch and self.backend == "unsloth":
            kwargs["packed_seq_lengths"] = batch["packed_seq_lengths"]
        # No KV cache: nothing reads it, and with one transformers ignores the packed-sequence mask.
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **kwargs)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch.get("num_samples", batch["input_ids"].shape[0]))
        return loss

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.val_names = list(getattr(dm, "val_names", []) or [])
        if stage in ("fit", "validate", "test"):
            # Two sums per dataset: loss over scored tokens, and how many tokens were scored.
            self.loss_sums = torch.nn.ModuleList(SumMetric() for _ in self.val_names)
            self.token_counts = torch.nn.ModuleList(SumMetric() for _ in self.val_names)
            self.sample_counts = torch.nn.ModuleList(SumMetric() for _ in self.val_names)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        n_tokens = (batch["labels"][:, 1:] != -100).sum()  # the model shifts labels by one
        loss = self(batch).loss.float()  # mean over the batch's scored tokens
        self.loss_sums[dataloader_idx].update(loss * n_tokens)
        self.token_counts[dataloader_idx].update(n_tokens)
        self.sample_counts[dataloader_idx].update(batch.get("num_samples", batch["input_ids"].shape[0]))

    test_step = validation_step

    def _epoch_results(self) -> list[dict]:
        results = []
        for i, name in enumerate(self.val_names):
            total, tokens, rows = (
                float(m[i].compute()) for m in (self.loss_sums, self.token_counts, self.sample_counts)
            )
            mean = total / tokens if tokens else float("nan")
            results.append(
                {"dataset": name, "rows": int(rows), "tokens": int(tokens), "loss": mean, "ppl": math.exp(mean)}
            )
            for m in (self.loss_sums, self.token_counts, self.sample_counts):
                m[i].reset()
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for m in (*self.loss_sums, *self.token_counts, *self.sample_counts):
                m.reset()
            return
        results = self._epoch_results()
        for r in results:
            self.log(f"val/{r['dataset']}/loss", r["loss"], sync_dist=False, add_dataloader_idx=False)
            self.log(f"val/{r['dataset']}/ppl", r["ppl"], sync_dist=False, add_dataloader_idx=False)
        if results:
            tokens = sum(r["tokens"] for r in results)
            overall = sum(r["loss"] * r["tokens"] for r in results) / max(tokens, 1)
            self.log("val/loss", overall, prog_bar=True, add_dataloader_idx=False)
        self.last_results = results

    def on_test_epoch_end(self) -> None:
        self.last_results = self._epoch_results()
        for r in self.last_results:
            self.log(f"test/{r['dataset']}/loss", r["loss"], add_dataloader_idx=False)

    def predict_step(self, batch: dict, batch_idx: int):
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [{"prompt": p, "answer": a.strip()} for p, a in zip(batch["prompt"], answers, strict=True)]

    # -- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = self.optim
        kw = dict(lr=o["lr"], weight_decay=o["weight_decay"], betas=o["betas"])
        if o["name"] == "adamw":
            opt = torch.optim.AdamW(params, **kw)
        else:
            import bitsandbytes as bnb

            opt = (bnb.optim.AdamW8bit if o["name"] == "adamw_8bit" else bnb.optim.PagedAdamW8bit)(params, **kw)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = self.sched["warmup"]

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.sched["name"] == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 1.0 - progress if self.sched["name"] == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- reports -----------------------------------------------------------------------------------------------
    def write_results(self, folder: str | Path, results: list[dict], seen: dict[str, bool], run: str) -> list[Path]:
        """The per-dataset table as JSON, CSV and Markdown in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = [{**r, "seen_in_training": seen.get(r["dataset"], False), "run": run} for r in results]
        (folder / "validation.json").write_text(json.dumps(rows, indent=2) + "\n")
        cols = ["run", "dataset", "rows", "tokens", "loss", "ppl", "seen_in_training"]
        csv = [",".join(cols)] + [",".join(_fmt(r[c]) for c in cols) for r in rows]
        (folder / "validation.csv").write_text("\n".join(csv) + "\n")
        md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
        md.append("\n`seen_in_training`: the validation rows are also training rows, so that loss is not held-out.")
        (folder / "validation.md").write_text("\n".join(md) + "\n")
        return [folder / f"validation.{e}" for e in ("json", "csv", "md")]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6f}"
    return str(v)
