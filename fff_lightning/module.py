"""``FFFModule``: the LightningModule around a base model and its FFF/LoRA adapters."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torchmetrics import SumMetric

from fff_lightning import backends, kinds, memory, table
from fff_lightning.adapters import is_adapter, mismatch, resolve_adapters, save_adapters
from fff_lightning.backends.packed_attention import one_call_per_row
from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.data.formatting import IGNORE
from fff_lightning.data.plan import DataPlan
from fff_lightning.distributed import HostValue, check_strategy, config_getter
from fff_lightning.errors import ConfigError, Diverged
from fff_lightning.generation import Sampling
from fff_lightning.loading import load_model
from fff_lightning.plan import RunPlan, current, plan_run
from fff_lightning.spec import AdapterSpec, BaseModelConfig, FFFConfig, LoRAConfig, choice

log = logging.getLogger(__name__)
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")
SCHEDULERS = ("linear", "cosine", "constant")


#: Logit values per fp32 slice when validation scores samples one by one (64 MiB: 256 positions of Gemma's 262k
#: vocabulary, 2,048 of Mistral's 32k), so the copy beside the model's own logits stays small on a large vocabulary.
SAMPLE_LOSS_CHUNK = 1 << 24


class FFFModule(L.LightningModule):
    """Train and evaluate FFF and/or LoRA adapters on a frozen (4-bit) base model.

    Validation loss per dataset is a **token-weighted mean cross-entropy**: the sum of every scored token's loss
    over the whole validation set divided by the number of scored tokens, accumulated with torchmetrics (so it is
    exact across batches and devices). Hugging Face's ``eval_loss`` is the mean of per-batch means, which weights
    tokens of short batches more; the two agree only when every batch scores the same number of tokens.

    What callbacks may use (and all that fff_lightning's own use): ``adapters`` (the run's
    :class:`~fff_lightning.spec.AdapterSpec`), ``base`` (its :class:`~fff_lightning.spec.BaseModelConfig`),
    ``base_shape()`` (the base model's ``transformers`` config, read without weights), ``export_adapters(folder,
    **facts)`` (write the adapter files) and ``preflight(trainer)`` (every check that needs no weight and no data).

    Args:
        base: the base model and backend.
        fff: the FFF adapter, or ``None``.
        lora: the LoRA adapter, or ``None``.
        dora: the DoRA adapter (PEFT's ``use_dora``; LoRA's fields), or ``None``; not with ``lora``.
        par_bn: the parallel bottleneck adapter beside the MLPs (He et al. 2022), or ``None``.
        adapter_path: start from saved adapters (a folder written by ``save_adapters``); its own JSON config
            decides the adapters; ``fff``/``lora``, if also given, must agree with it.
        optimizer: ``adamw`` (torch), ``adamw_8bit`` or ``paged_adamw_8bit`` (bitsandbytes).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        scheduler: ``linear`` (decay to 0), ``cosine`` (to 0) or ``constant``, each after ``warmup_steps``.
        warmup_steps: linear warm-up steps.
        warmup_from_zero: the warm-up starts at learning rate 0, so the first step changes nothing (Hugging Face's
            schedule, the research's); otherwise step ``k`` of the warm-up uses ``lr * (k + 1) / (warmup + 1)``.
        val_reduction: how a dataset's validation loss is reduced: ``tokens`` (every scored token weighs the same)
            or ``batches`` (the mean of per-batch means weighted by batch size: Hugging Face's ``eval_loss``, the
            research's table, which depends on ``data.val_batch_size``; not with packing).
        seed: seeds the adapters' initialisation.
        max_new_tokens: answer length for ``predict``.
        sampling: how ``predict`` chooses tokens (:class:`~fff_lightning.generation.Sampling`): greedy by default;
            ``temperature``, ``top_p``, ``top_k`` to sample (seeded by ``seed``), ``stop`` strings that end answers.
        on_nonfinite: what a step whose loss or gradient is NaN or infinite does: ``stop`` the run there (the
            default: the check costs no GPU sync, so it is read at the next step, before anything is saved) or
            ``skip`` the step (its update is dropped; a GPU sync per step; skips are counted and logged).
    """

    def __init__(
        self,
        base: BaseModelConfig = BaseModelConfig(),  # noqa: B008  (a frozen-by-convention default, never mutated)
        fff: FFFConfig | None = None,
        lora: LoRAConfig | None = None,
        adapter_path: str | None = None,
        optimizer: str = "adamw",
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "linear",
        warmup_steps: int = 1,
        warmup_from_zero: bool = False,
        val_reduction: str = "tokens",
        seed: int = 12,
        max_new_tokens: int = 128,
        sampling: Sampling = Sampling(),  # noqa: B008  (frozen)
        on_nonfinite: str = "stop",
        **adapters,
    ):
        """``adapters``: the sections of the other adapter kinds (:mod:`fff_lightning.kinds`), by name."""
        super().__init__()
        # With several processes a small validation set leaves some of them no batch of a dataset: they add zeros
        # to its sums, and no sample is repeated to even the processes out.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.base = base
        unknown = sorted(set(adapters) - set(kinds.names()))
        if unknown:
            raise TypeError(f"FFFModule got an unexpected keyword argument {unknown[0]!r}")
        configs = {"fff": fff, "lora": lora, **adapters}
        self._plan = current(base, adapter_path, configs)  # the CLI's plan of this run: resolved and checked already
        if self._plan is not None:  # the one answer to "which adapters": the plan's (sections beside a folder agree)
            self.adapters = AdapterSpec.resolve(configs, self._plan.adapters)
        else:
            self.adapters = resolve_adapters(adapter_path=adapter_path, **configs)
        self.adapter_path = adapter_path
        choice("model.optimizer", optimizer, OPTIMIZERS)
        choice("model.scheduler", scheduler, SCHEDULERS)
        choice("model.val_reduction", val_reduction, table.REDUCTIONS)
        choice("model.on_nonfinite", on_nonfinite, ("stop", "skip"))
        self.on_nonfinite = on_nonfinite
        if not lr > 0:
            raise ConfigError("model.lr", f"must be > 0; got {lr!r}")
        if isinstance(weight_decay, bool) or not 0 <= weight_decay < float("inf"):
            raise ConfigError("model.weight_decay", f"must be a finite number >= 0; got {weight_decay!r}")
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise ConfigError("model.betas", f"must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {list(betas)!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError("model.max_new_tokens", f"must be an int >= 1; got {max_new_tokens!r}")
        if warmup_steps < 0:
            raise ConfigError("model.warmup_steps", f"must be >= 0; got {warmup_steps!r}")
        self.optim = dict(name=optimizer, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.sched = dict(name=scheduler, warmup=warmup_steps, from_zero=warmup_from_zero)
        self.val_reduction = val_reduction
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        # The init arguments themselves (dataclasses as dicts), so LightningCLI can re-read them from a checkpoint.
        hparams = {
            "base": asdict(base),
            "fff": asdict(fff) if fff else None,
            "lora": asdict(lora) if lora else None,
            **{k: (v if isinstance(v, dict) or v is None else asdict(v)) for k, v in adapters.items()},
            "adapter_path": adapter_path,
            "optimizer": optimizer,
            "lr": lr,
            "weight_decay": weight_decay,
            "betas": list(betas),
            "scheduler": scheduler,
            "warmup_steps": warmup_steps,
            "warmup_from_zero": warmup_from_zero,
            "val_reduction": val_reduction,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "sampling": asdict(sampling),
            "on_nonfinite": on_nonfinite,
        }
        # Given, not read from this frame: Lightning would look for a local variable per parameter of the
        # signature, which has one per adapter kind (see _signature_with_kinds).
        with_given = _given_hyperparameters.set(hparams)
        try:
            self.save_hyperparameters(hparams)
        finally:
            _given_hyperparameters.reset(with_given)
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks them
        self.model = None
        self.backend = backends.get(base.backend)
        self.val_names: list[str] = []
        self._shape = None
        self._preflown = None  # the Trainer this run's checks were made for
        self._samples: dict = {}  # this validation's per-sample records, per dataset
        self.last_samples: list[dict] | None = None  # the last validation's, gathered (first process)
        self._pending = None  # (step, device flag): the last step's finiteness, read at the next step
        self.skipped_steps = 0
        # What a run's end reports (the CLI's table and closing lines read them):
        #: the last validation's per-dataset results (``table.results`` rows), or ``None`` if none ran
        self.last_results: list[dict] | None = None
        #: the global step at which ``last_results`` were made
        self.last_results_step: int | None = None
        #: the untrained model's results (``trainer.num_sanity_val_steps: -1`` validates all before training)
        self.first_results: list[dict] | None = None
        #: the global step this fit started from (> 0 when resumed)
        self.fit_start_step = 0

    #: Set by ``--resume_changes allow``: resume a checkpoint whose adapter settings differ from the run's (an init,
    #: an epsilon); tensors of other names or shapes are refused all the same.
    allow_resume_changes = False

    # -- the interface callbacks use ---------------------------------------------------------------------------
    @property
    def plan(self) -> RunPlan:
        """The run resolved and checked once (:mod:`fff_lightning.plan`): the CLI's, else made on first use."""
        if self._plan is None:
            self._plan = plan_run(self.base, self.adapters, self.adapter_path)
        return self._plan

    def base_shape(self):
        """The base model's ``transformers`` config (read once, without weights)."""
        if self._shape is None:
            self._shape = self._plan.shape if self._plan is not None else self.base.shape()
        return self._shape

    def preflight(self, trainer: L.Trainer, stage: str = "fit") -> None:
        """Every check that needs no weight and no data, before either is touched: the base model's limits and the
        adapters against its shape (layers, ranks, size, a saved adapter folder's header), the memory the adapters
        need for ``stage``, then, for ``fit``, each callback's own ``preflight(trainer, module)`` (the budget guard).
        The CLI calls it before anything loads; ``setup`` calls it for runs started from Python (after their data
        is prepared)."""
        if self._preflown is trainer:  # the CLI's, before anything loads; setup's for runs started from Python
            return
        self._preflown = trainer
        check_strategy(trainer)  # one device or DDP, before the model loads
        memory.resolve(self.base.max_memory_gib, trainer.strategy.root_device)  # a cap the device cannot give
        check_memory(self.plan.budget.trainable, self.optim["name"] if stage == "fit" else None, trainer)
        if stage != "fit":
            return
        for callback in trainer.callbacks:
            if hasattr(callback, "preflight"):
                callback.preflight(trainer, self)

    def data_plan(self) -> DataPlan | None:
        """The run's data as its data module plans it (:class:`~fff_lightning.data.plan.DataPlan`); ``None`` for a
        data module of one's own (then no per-dataset table, and the memory plan assumes one row of
        ``max_seq_length``)."""
        dm = self.trainer.datamodule
        return dm.plan() if isinstance(dm, FFFDataModule) else None

    def _plan_memory(self, cap: float, data: DataPlan | None) -> None:
        """Bind the memory plan for ``cap`` GiB and the prepared data's largest step into the run's plan, before any
        weight loads; the model loads with its checkpointing (:attr:`loaded_base`), the config stays as given."""
        tokens = data.step_tokens if data is not None else self.base.max_seq_length
        segments = data is not None and data.packing and not one_call_per_row(self.base.packed_attention)
        self._plan, why = self.plan.with_memory(cap, self.optim["name"], tokens, segments)
        if why is not None:
            log.warning("memory plan: %.2f GiB -> none (%s); checkpointing as configured", cap, why)
        elif self.trainer.is_global_zero:
            chosen = self._plan.memory
            rows = ", packed rows attended one call per document" if segments else ""
            print(f"memory plan: {cap:.2f} GiB -> {chosen.describe()}, predicted peak {chosen.peak_gib:.2f} GiB "
                  f"(steps of up to {tokens:,} tokens{rows})", flush=True)  # fmt: skip

    @property
    def memory_plan(self):
        """The memory plan the run loads with (``model.base.max_memory_gib``), if one was chosen."""
        return self._plan.memory if self._plan is not None else None

    @property
    def loaded_base(self) -> BaseModelConfig:
        """The base model as it loads: the config's, with the memory plan's checkpointing when one was chosen."""
        return self.plan.loaded_base

    def checkpoint_bytes(self) -> int:
        """About how large a checkpoint of this run is: the adapters and their optimizer states (the adapters are
        checked first: a size they must not have is refused, not estimated)."""
        return self.plan.checkpoint_bytes(_OPTIMIZER_BYTES[self.optim["name"]])

    def export_adapters(self, folder: str | Path, **facts) -> Path:
        """Write the adapters alone to ``folder`` (safetensors + the adapter config), with ``facts`` about the run."""
        shape = self.base_shape()
        base = {
            "name_or_path": self.backend.model_name(self.base),
            "hidden_size": shape.hidden_size,
            "num_hidden_layers": shape.num_hidden_layers,
            **facts,
        }
        return save_adapters(self.model, folder, base=base, spec=self.adapters)

    # -- model -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model, self.tokenizer, self._shape = load_model(
            self.loaded_base, self.adapters, adapter_path=self.adapter_path, seed=self.seed, plan=self.plan
        )
        # from_pretrained leaves the base model in eval mode, Lightning keeps each module's mode when fit starts,
        # and transformers and Unsloth checkpoint (and drop padding masks) only in training mode: train it.
        # Lightning's own loops put it in eval mode for validation and back afterwards.
        self.model.train()
        self._trainable = [p for p in self.model.parameters() if p.requires_grad]

    # -- checkpoints: adapters only ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if is_adapter(k, self.adapters)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._check_finite()  # a step that diverged is never saved
        checkpoint["fff_adapters"] = self.adapters.to_dict()
        t = self.trainer
        # What a resume must match before anything loads (check_checkpoint_run): the base model and the schedule
        checkpoint["fff_run"] = {
            "base": base_identity(self.plan),
            "schedule": {
                "max_steps": t.max_steps,
                "max_epochs": t.max_epochs,
                "accumulate_grad_batches": t.accumulate_grad_batches,
            },  # fmt: skip
        }

    def check_resume(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of other adapters (unless ``allow_resume_changes`` and every tensor still fits)."""
        check_checkpoint_adapters(checkpoint, self.adapters, self.allow_resume_changes)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from fff_lightning.checkpoint_io import finish_epoch_end_state

        self.check_resume(checkpoint)
        finish_epoch_end_state(checkpoint)  # a checkpoint of an epoch's end resumes into the next epoch
        self.configure_model()
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        mismatch("the checkpoint", expected, got, "the checkpoint", "the configured adapters")

    # -- steps -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        kwargs = self.backend.forward_kwargs(batch)
        # No KV cache: nothing reads it, and with one transformers ignores the packed-sequence mask.
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **kwargs)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self(batch).loss
        logged = loss.detach()
        if self.trainer.world_size > 1:
            loss, logged = self._global_token_mean(loss, batch["labels"])
        self._step_loss = logged
        self.log("train/loss", logged, prog_bar=True, batch_size=batch.get("num_samples", batch["input_ids"].shape[0]))
        self._log_step(self.trainer.global_step + 1)  # the step this batch makes, as the text counts it
        return loss

    def _log_step(self, step: int) -> None:
        """Put the loggers' x value (Lightning's ``step`` metric) at ``step``, the optimizer steps taken once these
        values are (Lightning alone logs a step's values at one less: "step 32" at 31), and keep Lightning's
        ``epoch`` beside it. Made on the device by a fill (no copy from the host, no sync); read at log steps only."""
        for name, value in (("step", step), ("epoch", self.current_epoch)):
            self.log(name, torch.full((), float(value), device=self.device), add_dataloader_idx=False)

    def _global_token_mean(self, loss: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``W`` processes, weigh each one's mean loss by its share of the step's scored tokens, so the
        gradient DDP averages is that of the mean over every scored token of the step: the same as one device with
        ``W`` times the batch. One all-reduce of two numbers per step, on the device (no host sync). Returns the
        loss to differentiate and the step's mean loss over all processes (what is logged and checked)."""
        n = (labels[:, 1:] != IGNORE).sum().float()  # the model's own denominator: labels shifted by one
        # A share with no scored token has a 0/0 loss: it adds nothing (zero gradients), as in one big batch.
        loss = torch.where(n > 0, loss.float(), torch.zeros((), device=loss.device))
        stats = torch.stack([n, loss.detach() * n])
        torch.distributed.all_reduce(stats)
        total = stats[0].clamp_min(1)
        return loss * n * self.trainer.world_size / total, stats[1] / total

    # -- numerics: a diverged step never goes unnoticed ----------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self._trainable if p.grad is not None]
        finite = torch.isfinite(self._step_loss)
        # The learning rate of this update and the gradients' total L2 norm before any clipping, as device tensors:
        # Lightning reads them only at its log steps (trainer.log_every_n_steps), so no step waits for the GPU.
        lr = optimizer.param_groups[0]["lr"]
        self.log("train/lr", torch.full((), float(lr), device=self.device))
        if grads:
            norms = torch.stack(torch._foreach_norm(grads))
            finite = finite & torch.isfinite(norms).all()
            self.log("train/grad_norm", torch.linalg.vector_norm(norms.float()))
        step = self.trainer.global_step + 1  # the step this update makes, counted from 1
        if self.on_nonfinite == "skip":
            if not bool(finite):  # one sync: the update must not happen
                for p in self._trainable:
                    p.grad = None  # optimizers leave parameters without a gradient alone
                self.skipped_steps += 1
                self.log("train/skipped_steps", float(self.skipped_steps))
                log.warning("step %d: the loss or a gradient is not finite; step skipped (%d so far)", step,
                            self.skipped_steps)  # fmt: skip
        else:
            self._pending = (step, HostValue(finite))  # read at the next step, without a sync now

    def _check_finite(self) -> None:
        """Stop the run if the last step was not finite (read now, long after the GPU computed it)."""
        if self._pending is None:
            return
        step, finite = self._pending
        self._pending = None
        if not bool(finite.get()):
            ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or getattr(
                self.trainer.checkpoint_callback, "last_model_path", ""
            )
            last = f"the last checkpoint, {ckpt}, is from before it" if ckpt else "no checkpoint was saved before it"
            raise Diverged(
                f"step {step}: the training loss or a gradient is not finite (NaN or infinity): the run diverged "
                f"and stops here; nothing from step {step} on is saved, {last}. Lower model.lr, or set "
                "model.on_nonfinite: skip to drop such steps"
            )

    def on_train_start(self) -> None:
        from fff_lightning.runs import keep_claimed

        self.fit_start_step = self.trainer.global_step  # > 0 when resumed: fit's closing lines say so
        keep_claimed()  # from here a failure keeps the run folder (its logs and config), not only a checkpoint

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._check_finite()

    def on_train_end(self) -> None:
        self._check_finite()

    def setup(self, stage: str) -> None:
        self.preflight(self.trainer, stage)  # done already under the CLI; before the model loads either way
        # Each process on its own device (the strategy has set it by now), before any weight loads.
        device = self.trainer.strategy.root_device
        cap = memory.resolve(self.base.max_memory_gib, device)
        data = self.data_plan()
        if stage == "fit" and cap is not None and self.base.plan_memory:
            self._plan_memory(cap, data)
        memory.apply(cap, device)
        self.val_names = list(data.val_names) if data is not None else []
        if stage == "fit" and data is not None:
            check_val_interval(self.trainer, data.steps_per_epoch)
        if self.val_reduction == "batches" and data is not None and data.packing:
            raise ConfigError("model.val_reduction", "'batches' weighs padded batches; it has no meaning with packing")
        if stage == "predict" and self.max_new_tokens >= self.base.max_seq_length:
            raise ConfigError(
                "model.max_new_tokens",
                f"{self.max_new_tokens} leaves no room for a prompt within max_seq_length {self.base.max_seq_length}",
            )
        if stage in ("fit", "validate", "test"):
            # Sums per dataset: loss over scored tokens, scored tokens, samples, batch means x samples, and
            # non-finite batches. nan_strategy="disable": a NaN loss stays NaN in the sums (the default drops
            # it, and a diverged run would score 0).
            self.sums = torch.nn.ModuleList(
                torch.nn.ModuleList(SumMetric(nan_strategy="disable") for _ in range(5)) for _ in self.val_names
            )

    def sample_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed loss, scored tokens)`` of each sample of a batch, in the batch's order: the model's logits
        (called without labels, so every backend returns them) against the labels shifted by one, in fp32, a slice
        of positions at a time; a packed row is split at its samples' starts (where ``position_ids`` restart)."""
        kwargs = self.backend.forward_kwargs(batch)
        logits = self.model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
        labels = batch["labels"]
        rows, length = labels.shape
        if "position_ids" in batch:  # packed: one row, several samples
            owner = (batch["position_ids"] == 0).long().cumsum(-1) - 1
            n = int(batch["sample_index"].numel()) if "sample_index" in batch else int(owner.max()) + 1
        else:
            owner = torch.arange(rows, device=labels.device)[:, None].expand(rows, length)
            n = rows
        loss_sum = torch.zeros(n, dtype=torch.float64, device=labels.device)
        tokens = torch.zeros(n, dtype=torch.long, device=labels.device)
        step = max(1, SAMPLE_LOSS_CHUNK // logits.shape[-1])  # positions per fp32 slice of the logits
        for r in range(rows):
            for start in range(0, length - 1, step):
                end = min(start + step, length - 1)
                target = labels[r, start + 1 : end + 1]
                tok = torch.nn.functional.cross_entropy(
                    logits[r, start:end].float(), target, ignore_index=IGNORE, reduction="none"
                )
                scored = target != IGNORE
                who = owner[r, start + 1 : end + 1]
                loss_sum.index_add_(0, who, torch.where(scored, tok, torch.zeros_like(tok)).double())
                tokens.index_add_(0, who, scored.long())
        return loss_sum, tokens

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        per_sample, per_tokens = self.sample_losses(batch)
        n_tokens = per_tokens.sum()
        n_samples = batch.get("num_samples", batch["input_ids"].shape[0])
        loss = (per_sample.sum() / n_tokens).float()  # mean over the batch's scored tokens (NaN if it has none)
        values = (loss * n_tokens, n_tokens, n_samples, loss * n_samples, (~torch.isfinite(loss)).float())
        for metric, value in zip(self.sums[dataloader_idx], values, strict=True):
            metric.update(value)
        if "sample_index" in batch and not self.trainer.sanity_checking:
            self._samples.setdefault(dataloader_idx, []).append(
                (batch["sample_index"].cpu(), per_tokens.cpu(), per_sample.cpu())
            )

    test_step = validation_step

    def _epoch_samples(self) -> list[dict] | None:
        """Every process's per-sample records of this validation, gathered (DDP) and in dataset order: one
        ``{"dataset", "sample", "tokens", "loss_sum"}`` per validation sample, on the first process; ``None``
        elsewhere."""
        mine = []
        for d, parts in sorted(self._samples.items()):
            for index, tokens, loss_sum in parts:
                mine += [(d, int(i), int(t), float(v)) for i, t, v in zip(index, tokens, loss_sum, strict=True)]
        self._samples = {}
        every = [mine]
        if self.trainer.world_size > 1:
            every = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(every, mine)
        if not self.trainer.is_global_zero:
            return None
        rows = sorted(r for part in every for r in part)
        return [{"dataset": self.val_names[d], "sample": i, "tokens": t, "loss_sum": v} for d, i, t, v in rows]

    def _epoch_results(self) -> list[dict]:
        results = []
        for name, metrics in zip(self.val_names, self.sums, strict=True):
            loss_sum, tokens, samples, batch_sum, bad = (float(m.compute()) for m in metrics)
            results.append(table.row(name, loss_sum, tokens, samples, batch_sum, self.val_reduction, int(bad)))
            for m in metrics:
                m.reset()
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            if math.isinf(self.trainer.num_sanity_val_steps) and self.trainer.global_step == 0:
                # trainer.num_sanity_val_steps: -1 validates the whole set before training: the untrained model's
                # table, which fit's table then shows beside its own, and the curves' first point (step 0).
                self.first_results = self._epoch_results()
                if self.trainer.is_global_zero:
                    first = {f"val/{r['dataset']}/loss": r["loss"] for r in self.first_results}
                    first["val/loss"] = table.overall_loss(self.first_results)
                    for logger in self.trainer.loggers:
                        logger.log_metrics(first, step=0)
                return
            for metrics in self.sums:
                for m in metrics:
                    m.reset()
            return
        results = self._epoch_results()
        self.last_samples = self._epoch_samples()
        for r in results:
            self.log(f"val/{r['dataset']}/loss", r["loss"], sync_dist=False, add_dataloader_idx=False)
            self.log(f"val/{r['dataset']}/ppl", r["ppl"], sync_dist=False, add_dataloader_idx=False)
        if results:
            self.log("val/loss", table.overall_loss(results), prog_bar=True, add_dataloader_idx=False)
            self._log_step(self.trainer.global_step)  # the adapters after that many steps: the table's "step N"
        self.last_results = results
        self.last_results_step = self.trainer.global_step  # fit's table says when it was made

    def on_test_epoch_end(self) -> None:
        self.last_results = self._epoch_results()
        self.last_samples = self._epoch_samples()
        for r in self.last_results:
            self.log(f"test/{r['dataset']}/loss", r["loss"], add_dataloader_idx=False)

    def on_predict_start(self) -> None:
        if not self.sampling.greedy:  # the same seed, the same answers
            torch.manual_seed(self.seed + self.global_rank)

    def predict_step(self, batch: dict, batch_idx: int):
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **self.sampling.generate_kwargs(self.tokenizer),
        )
        answers = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [{"prompt": p, "answer": self.sampling.cut(a).strip()} for p, a in zip(batch["prompt"], answers,
                                                                                      strict=True)]  # fmt: skip

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
                return step / warmup if self.sched["from_zero"] else (step + 1) / (warmup + 1)
            if self.sched["name"] == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 1.0 - progress if self.sched["name"] == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_checkpoint_adapters(checkpoint: dict, adapters: AdapterSpec, allow_changes: bool = False) -> None:
    """Refuse a checkpoint of other adapters than ``adapters`` (unless ``allow_changes``: other settings of the same
    tensors, whose shapes are still checked when the checkpoint loads)."""
    if "fff_adapters" not in checkpoint:
        return
    saved = AdapterSpec.from_checkpoint(checkpoint)
    if saved != adapters and not allow_changes:
        raise ConfigError(
            "ckpt_path",
            f"the checkpoint holds other adapters ({saved.legend()}: {saved.to_dict()}) than this run's "
            f"({adapters.legend()}); give the run's own checkpoint, or --resume_changes allow if you mean it",
        )


#: The base model's config fields a checkpoint records: another value of any is another model.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                 "num_attention_heads", "num_key_value_heads")  # fmt: skip


def base_identity(plan: RunPlan) -> dict:
    """The base model a run trains on, as its checkpoints record it: its name (a hub id, or a folder or file by its
    absolute path, so ``./models/x`` given from another folder is the same model) and shape."""
    name = backends.get(plan.base.backend).identity(plan.base)
    return {"name": name, "shape": {k: getattr(plan.shape, k, None) for k in _SHAPE_FIELDS}}


def check_checkpoint_run(checkpoint: dict, plan: RunPlan, trainer_cfg, allow_changes: bool = False,
                         schedule: bool = True) -> str | None:  # fmt: skip
    """Refuse, before anything loads or any folder is claimed, a checkpoint made on another base model (another
    shape always; another name unless ``allow_changes``: a moved folder) or with another schedule length
    (``trainer.max_steps``, ``max_epochs``, ``accumulate_grad_batches``: the learning rate would follow another
    schedule than an uninterrupted run; rebuilt on the new total with ``allow_changes``). Returns a note for what
    ``allow_changes`` let through, else ``None``. Checkpoints from before these were recorded are not checked."""
    saved = checkpoint.get("fff_run")
    if not isinstance(saved, dict):
        return None
    notes = []
    ours = base_identity(plan)
    base = saved.get("base") or {}
    shape = {k: v for k, v in (base.get("shape") or {}).items() if ours["shape"].get(k) != v}
    if shape:
        k = next(iter(shape))
        raise ConfigError("ckpt_path", f"the checkpoint was trained on another base model: its {k} is {shape[k]}, "
                          f"this run's {ours['shape'][k]} ({base.get('name')} against {ours['name']})")  # fmt: skip
    if base.get("name") not in (None, ours["name"]):
        if not allow_changes:
            raise ConfigError("ckpt_path", f"the checkpoint was trained on {base['name']}, this run's base model is "
                              f"{ours['name']} (same shape): give the run's own base model, or --resume_changes "
                              "allow if it is the same model moved")  # fmt: skip
        notes.append(f"base model {base['name']} -> {ours['name']}")
    sched = saved.get("schedule") if schedule else None
    if not sched:
        return "; ".join(notes) or None
    get = config_getter(trainer_cfg)
    steps = get("max_steps", -1)
    epochs = get("max_epochs", None)
    if epochs is None:  # Lightning's rule: 1000 epochs when no step limit, else no epoch limit
        epochs = 1000 if steps in (-1, None) and get("max_time", None) is None else -1
    now = {"max_steps": steps, "max_epochs": epochs, "accumulate_grad_batches": get("accumulate_grad_batches", 1)}
    for key, value in now.items():
        then = sched.get(key, value)
        if value != then:
            if not allow_changes:
                raise ConfigError(f"trainer.{key}", f"is {value}; the checkpoint's run had {then}: its "
                                  "learning-rate schedule would be rebuilt on another total, unlike an uninterrupted "
                                  f"run's. Resume with trainer.{key}: {then}, or give --resume_changes allow to "
                                  "rebuild it")  # fmt: skip
            notes.append(f"trainer.{key} {then} -> {value} (the learning-rate schedule is rebuilt on the new total)")
    return "; ".join(notes) or None


#: Bytes per trainable parameter for what training keeps besides the weights' own copy: the gradient, and the
#: optimizer's two moments (fp32 for AdamW; 8-bit AdamW keeps one byte each, plus small scales).
_OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}


def check_memory(trainable: int, optimizer: str | None, trainer) -> None:
    """Refuse adapters whose weights (and, for training, gradients and optimizer states) alone would not fit the
    device's memory (the GPU's total; on a CPU, the memory the system has available now)."""
    per_param = 4 + (4 + _OPTIMIZER_BYTES[optimizer] if optimizer else 0)
    need = trainable * per_param
    accelerator = type(getattr(trainer, "accelerator", None)).__name__
    if accelerator == "CUDAAccelerator" and torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "the GPU's"
    else:
        have, where = _available_ram(), "the memory this machine has available"
    if have and need > have:
        raise ConfigError(
            "model",
            f"the adapters alone need about {need / 2**30:.1f} GiB ({trainable:,} parameters x {per_param} bytes "
            f"for weights{', gradients and optimizer states' if optimizer else ''}), more than {where} "
            f"{have / 2**30:.1f} GiB: make them smaller",
        )


def _available_ram() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_val_interval(trainer, batches: int) -> None:
    """Refuse, before the model loads, a ``trainer.val_check_interval`` of more batches than an epoch has (Lightning
    would refuse it later, with a traceback, once the model is loaded)."""
    interval, limit = trainer.val_check_interval, trainer.limit_train_batches
    if not batches or not isinstance(interval, int) or trainer.check_val_every_n_epoch is None:
        return
    if getattr(trainer, "limit_val_batches", 1) == 0:
        return
    n = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if interval > n:
        raise ConfigError(
            "trainer.val_check_interval",
            f"{interval} is more than the {n} training batches of an epoch: give at most {n}, a fraction of the "
            "epoch (e.g. 0.25), or trainer.check_val_every_n_epoch null to count batches across epochs",
        )


def _signature_with_kinds() -> None:
    """Give ``FFFModule.__init__`` one keyword per adapter kind besides FFF and LoRA (``dora``, ``par_bn`` and any
    registered one), typed by the kind's config, so the command line and YAML configs take ``model.<kind>`` as they
    take ``model.fff``: a kind is added by its own module, not by editing this class."""
    import inspect

    sig = inspect.signature(FFFModule.__init__)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for kind in kinds.kinds():
        if kind.name in sig.parameters and kind.name not in ("fff", "lora"):
            raise ValueError(f"adapter kind {kind.name!r} ({type(kind).__module__}) is named like an option of the "
                             "model: give it another name")  # fmt: skip
        if kind.name not in sig.parameters:
            params.append(inspect.Parameter(kind.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=kind.config | None))  # fmt: skip
    FFFModule.__init__.__signature__ = sig.replace(parameters=params)


_signature_with_kinds()
