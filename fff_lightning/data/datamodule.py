"""``FFFDataModule``: the research's four-dataset mix, exact and reproducible, validated per dataset."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset

from fff_lightning.data.collate import LeftPadCollator, PackCollator, PadCollator
from fff_lightning.data.formatting import LOSS_ON, SYSTEM_TURNS, TEXT_STYLES
from fff_lightning.data.plan import DataPlan
from fff_lightning.data.prepare import Prepared, TextOptions, prepare_source
from fff_lightning.data.prompts import PromptRows, read_prompts
from fff_lightning.data.sampling import (
    SHUFFLES,
    PlannedBatchSampler,
    ResumableLoader,
    chunks,
    group_by_length,
    mix_order,
    pack_batches,
)
from fff_lightning.data.sources import SourceConfig, research_sources
from fff_lightning.distributed import processes
from fff_lightning.errors import ConfigError
from fff_lightning.spec import choice

log = logging.getLogger(__name__)
#: Stated bounds: a batch of more samples, a sequence or packed row of more tokens, or a training mix of more
#: samples than these is refused before anything is allocated (each far above a real run on one GPU).
MAX_BATCH = 4096
MAX_TOKENS = 1 << 20
MAX_SAMPLES = 50_000_000


def column(ds, name: str) -> list:
    """A whole column of a prepared (Arrow-backed) dataset as a Python list, in one conversion: ``ds[name]`` is a
    lazy column in datasets 4 whose every ``[i]`` is a table lookup (12 s for the research's mix)."""
    return ds.data.column(name).to_pylist()


class TokenizedRows(Dataset):
    """Rows of several tokenized datasets in a fixed order: ``order[i] = (source index, row index)``."""

    def __init__(self, parts: list, order: list[tuple[int, int]]):
        self.parts = parts
        self.order = order
        self._lengths: list[list[int]] | None = None

    def part_lengths(self) -> list[list[int]]:
        """Each part's token counts, by row (read once from the prepared ``length`` column)."""
        if self._lengths is None:
            self._lengths = [column(p, "length") for p in self.parts]
        return self._lengths

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        s, r = self.order[i]
        row = self.parts[s][r]
        return {"input_ids": row["input_ids"], "labels": row["labels"], "source": s, "index": r}

    def lengths(self) -> list[int]:
        """Every sample's token count, in order (read from the prepared ``length`` column, not by decoding)."""
        cols = self.part_lengths()
        return [cols[s][r] for s, r in self.order]


class FFFDataModule(L.LightningDataModule):
    """The training mix and one named validation set per dataset.

    Args:
        sources: the datasets (default: the research's four, from the hub).
        paths: ``{name: path}`` to point a source at a local file or folder from the command line, e.g.
            ``--data.paths '{metamath: data/mm.jsonl}'``.
        text_style: ``research`` (``###USER: ...\\n###ASSISTANT: ...``) or ``chat_template``.
        loss_on: ``all`` tokens (the research) or ``assistant`` tokens only.
        chat_template: a Jinja chat template for ``chat_template`` style (default: the tokenizer's own).
        eos: close every sample with EOS (scored like any token). The research added none.
        system_turns: ``prepend`` a conversation's system message to the next user turn, or ``drop`` it (the
            research).
        max_seq_length: longer samples are truncated (and counted).
        batch_size: training micro-batch size.
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: dataloader workers; batches do not depend on it.
        seed: selects random takes and shuffles the mix (the research used 12).
        group_by_length: batch samples of similar length together to cut padding (seeded).
        shuffle: how the mix is shuffled once: ``fff_lightning`` (Python's ``random``) or ``datasets`` (the
            permutation of ``datasets.Dataset.shuffle(seed)``, the research's).
        drop_last: leave out the last, partial training batch of an epoch (the research trained
            ``len(data) // batch_size`` steps).
        packing: pack each batch's samples into one row with no padding (document-aware attention: no sample
            sees another, and the loss of every token is the unpacked one); a batch then holds as many samples
            as fit ``tokens_per_batch``, so an epoch has fewer, fuller steps. Validation is packed too.
        tokens_per_batch: the token budget of a packed batch (default ``batch_size * max_seq_length``); at least
            ``max_seq_length``, so every sample fits.
        tokenizer: tokenizer hub id or folder; ``None``: Mistral-7B's, offline.
        cache_dir: where tokenized data is cached (default ``$FFF_CACHE/data``); ``None`` with ``cache: false``
            disables the cache.
        cache: reuse tokenized data keyed by everything that changes it.
        num_proc: processes for tokenization (``datasets.map``).
        predict_file: prompts for ``predict``: ``.jsonl`` with a ``prompt`` field per line, ``.json`` (an array of
            prompts), or plain text with one prompt per line.
        max_prompt_tokens: longer prompts keep their last tokens (the command line sets it to ``max_seq_length -
            model.max_new_tokens``, so every answer has room); default ``max_seq_length``.
    """

    def __init__(
        self,
        sources: list[SourceConfig] | None = None,
        paths: dict[str, str] | None = None,
        text_style: str = "research",
        loss_on: str = "all",
        chat_template: str | None = None,
        eos: bool = True,
        system_turns: str = "prepend",
        max_seq_length: int = 2048,
        batch_size: int = 3,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 12,
        group_by_length: bool = False,
        shuffle: str = "fff_lightning",
        drop_last: bool = False,
        packing: bool = False,
        tokens_per_batch: int | None = None,
        tokenizer: str | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
        num_proc: int | None = None,
        predict_file: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        super().__init__()
        choice("data.text_style", text_style, TEXT_STYLES)
        choice("data.loss_on", loss_on, LOSS_ON)
        val_size = 1 if val_batch_size is None else val_batch_size  # None: batch_size; 0 is refused
        for name, v, bound in (("max_seq_length", max_seq_length, MAX_TOKENS), ("batch_size", batch_size, MAX_BATCH),
                               ("val_batch_size", val_size, MAX_BATCH)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= bound:
                raise ConfigError(f"data.{name}", f"must be an int from 1 to {bound:,}; got {v!r}")
        for name, v in (("num_workers", num_workers), ("num_proc", num_proc or 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"data.{name}", f"must be an int >= 0; got {v!r}")
        sources = list(sources) if sources is not None else research_sources()
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ConfigError("data.sources", f"dataset names must be unique; got {names}")
        for name, path in (paths or {}).items():
            if name not in names:
                raise ConfigError(f"data.paths.{name}", f"no dataset named {name!r}; datasets: {', '.join(names)}")
            sources[names.index(name)] = replace(sources[names.index(name)], path=path)
        self.sources = [s for s in sources if s.enabled]
        if not self.sources:
            raise ConfigError("data.sources", "every dataset is disabled")
        choice("data.system_turns", system_turns, SYSTEM_TURNS)
        choice("data.shuffle", shuffle, SHUFFLES)
        self.opts = TextOptions(text_style, loss_on, max_seq_length, chat_template, eos, system_turns)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        cores = os.cpu_count() or 1
        if num_workers > cores or (num_proc or 0) > cores:
            log.info("data: num_workers/num_proc capped at this machine's %d cores", cores)
        self.num_workers = min(num_workers, cores)
        self.seed = seed
        self.group = group_by_length
        self.packing = packing
        self.tokens_per_batch = batch_size * max_seq_length if tokens_per_batch is None else tokens_per_batch
        if not isinstance(self.tokens_per_batch, int) or not max_seq_length <= self.tokens_per_batch <= MAX_TOKENS:
            raise ConfigError(
                "data.tokens_per_batch",
                f"must be an int from max_seq_length ({max_seq_length:,}, so every sample fits) to {MAX_TOKENS:,}; "
                f"got {self.tokens_per_batch!r}",
            )
        if packing and group_by_length:
            log.warning("data.group_by_length has no effect with packing: packed batches hold no padding")
        self.tokenizer_name = tokenizer
        self.cache_dir = cache_dir
        self.cache = cache
        self.num_proc = min(num_proc, cores) if num_proc else num_proc
        self.predict_file = predict_file
        self.max_prompt_tokens = max_prompt_tokens or max_seq_length
        self._skip = 0  # batches of the current epoch already trained on, restored from a checkpoint
        self.prepared: list[Prepared] = []
        self.summary: list[dict] = []
        self._tokenizer = None

    # -- preparation -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fff_lightning.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _cache_root(self) -> Path | None:
        if not self.cache:
            return None
        from fff_lightning.files import cache_dir

        return Path(self.cache_dir) if self.cache_dir else cache_dir() / "data"

    def _prepare_all(self) -> list[Prepared]:
        if self.opts.style == "chat_template" and not (self.opts.chat_template or self.tokenizer.chat_template):
            raise ConfigError(
                "data.chat_template", "the tokenizer has no chat template: give data.chat_template or use research"
            )
        root = self._cache_root()
        return [prepare_source(s, self.tokenizer, self.opts, self.seed, root, self.num_proc) for s in self.sources]

    def prepare_data(self) -> None:
        """Download and tokenize once per machine (Lightning calls this on local rank 0 only)."""
        self._prepare_all()

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            if not self.predict_file:
                raise ConfigError("data.predict_file", "predict needs prompts: give --data.predict_file <file>")
            self.predict_set = PromptRows(
                read_prompts(self.predict_file),
                self.tokenizer,
                self.opts.style,
                self.opts.chat_template,
                max(self.max_prompt_tokens, 1),
            )
            return
        if self.prepared:
            return
        self.prepared = self._prepare_all()
        world, _ = self._ranks()
        parts = [p.train for p in self.prepared]
        total = sum(len(p) * s.source.repeat for p, s in zip(parts, self.prepared, strict=True))
        if total > MAX_SAMPLES:
            raise ConfigError(
                "data.sources",
                f"the training mix would hold {total:,} samples (rows x repeat), more than the bound of "
                f"{MAX_SAMPLES:,}: lower train_rows or repeat",
            )
        order = mix_order([len(p) for p in parts], [p.source.repeat for p in self.prepared], self.seed, self.shuffle)
        self.train_set = TokenizedRows(parts, order)
        if self.group and not self.packing:
            lengths = self.train_set.part_lengths()
            order = group_by_length(order, lambda x: lengths[x[0]][x[1]], self.batch_size * world, self.seed)
            self.train_set.order = order
        self.val_sets = [
            TokenizedRows([p.val], [(0, r) for r in range(len(p.val))]) for p in self.prepared if p.val is not None
        ]
        self.val_names = [p.source.name for p in self.prepared if p.val is not None]
        self.train_batches = self._train_plan()
        self.val_batches = self._val_plans()
        self.summary = self._summarise()
        if self._ranks()[1] == 0:
            self._print_summary()

    # -- which samples each step (and each process) sees ---------------------------------------------------------
    def _ranks(self) -> tuple[int, int]:
        """``(world size, this process's rank)``: several processes (DDP) share the data out between them."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _train_plan(self) -> list[list[int]]:
        """This process's training batches (lists of sample indices), in order.

        One process: batches of ``batch_size`` in the mix's order (packed: of at most ``tokens_per_batch`` tokens).
        ``W`` processes: step ``k`` takes the samples one process would see at step ``k`` with ``W`` times the batch,
        split in ``W`` parts in order (packed: the plan's batches ``kW`` to ``kW + W - 1``), so nothing overlaps and
        nothing is left out but a last step too small to give every process a sample.
        """
        world, rank = self._ranks()
        if self.packing:
            plan = pack_batches(self.train_set.lengths(), self.tokens_per_batch, self.seed)
            steps = len(plan) // world if world > 1 else len(plan)
            return [plan[k * world + rank] for k in range(steps)]
        n, size = len(self.train_set), self.batch_size * world
        batches = chunks(n, size)
        if batches and (len(batches[-1]) < world or (self.drop_last and len(batches[-1]) < size)):
            batches.pop()
        return [_split(b, world)[rank] for b in batches]

    def _val_plans(self) -> list[list[list[int]]]:
        """This process's validation batches, per dataset: the datasets' batches, one after the other, dealt out
        round-robin, so no sample is seen twice, none is left out (the loss sums are added up across processes)
        and the processes' counts differ by at most one."""
        world, rank = self._ranks()
        plans, dealt = [], 0
        for ds in self.val_sets:
            if self.packing:
                plan = pack_batches(ds.lengths(), self.tokens_per_batch, None)
            else:
                plan = chunks(len(ds), self.val_batch_size)
            plans.append([b for k, b in enumerate(plan) if (dealt + k) % world == rank])
            dealt += len(plan)
        validating = getattr(self.trainer, "limit_val_batches", 1) != 0 if self.trainer is not None else True
        if 0 < dealt < world and validating:
            # A process with no validation batch at all would skip validation and leave the others waiting for its
            # sums: refuse it.
            raise ConfigError(
                "data.val_batch_size",
                f"the validation sets make {dealt} batch{'es' if dealt > 1 else ''} in all, fewer than the {world} "
                "processes: lower data.val_batch_size (or data.tokens_per_batch when packing), use fewer devices, "
                "or validate on one device",
            )
        return plans

    # -- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, plan: list[list[int]], skip: int = 0, collate=None) -> DataLoader:
        # The batches are fixed in setup(), so they do not depend on workers or processes.
        if self.packing and collate is None:
            collate = PackCollator()
        return ResumableLoader(
            ds,
            batch_sampler=PlannedBatchSampler(plan, skip=skip),
            num_workers=self.num_workers,
            collate_fn=collate or PadCollator(self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        skip, self._skip = self._skip, 0
        return self._loader(self.train_set, self.train_batches, skip=skip)

    def predict_dataloader(self) -> DataLoader:
        plan = chunks(len(self.predict_set), self.val_batch_size)
        return self._loader(self.predict_set, plan, collate=LeftPadCollator(self.tokenizer.pad_token_id))

    def plan(self) -> DataPlan:
        """The data as the run reads it (:class:`~fff_lightning.data.plan.DataPlan`): the config's bound before
        :meth:`setup`, the prepared data's facts after it."""
        worst = self.tokens_per_batch if self.packing else self.batch_size * self.opts.max_seq_length
        if not self.prepared:
            return DataPlan(self.packing, worst)
        largest = None
        if self.train_batches:
            lengths = self.train_set.lengths()  # already truncated to max_seq_length
            if self.packing:
                largest = max(sum(lengths[i] for i in b) for b in self.train_batches)
            else:
                largest = max(len(b) * max(lengths[i] for i in b) for b in self.train_batches)
        return DataPlan(self.packing, worst, True, tuple(self.val_names), len(self.train_batches), largest)

    def train_batches_per_epoch(self) -> int:
        """Optimizer steps (per process) in an epoch."""
        return len(self.train_batches)

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints: how many batches of the current epoch were trained on."""
        trainer = self.trainer
        if trainer is None or not hasattr(self, "train_set"):
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        per_epoch = min(self.train_batches_per_epoch(), trainer.num_training_batches)  # trainer.limit_train_batches
        return {
            "batches_done_in_epoch": done if done < per_epoch else 0,  # an epoch's end: the next starts afresh
            "seed": self.seed,
            "train_samples": len(self.train_set),
            "settings": self.settings(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.check_resume(state)
        self._skip = int(state.get("batches_done_in_epoch", 0))

    def settings(self, world: int | None = None) -> dict:
        """What decides which samples a step sees, in which order: a resume must keep all of it. ``world``: the
        number of processes (default: the trainer's)."""
        if world is None:
            world = processes(self.trainer) if self.trainer is not None else 1
        return {
            "sources": [{k: v for k, v in asdict(s).items() if k != "enabled"} for s in self.sources],
            "text": asdict(self.opts),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "group_by_length": self.group,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "packing": self.packing,
            "tokens_per_batch": self.tokens_per_batch if self.packing else None,
            "processes": world,
        }

    #: Set by ``--resume_changes allow``: resume even if the data settings differ from the checkpoint's.
    allow_resume_changes = False

    def check_resume(self, state: dict, world: int | None = None) -> None:
        """Refuse to resume a checkpoint written with other data settings or another number of processes (unless
        ``allow_resume_changes``): its position in the epoch would point at other samples."""
        saved = state.get("settings")
        if saved is None or self.allow_resume_changes:
            return
        now = json.loads(json.dumps(self.settings(world), default=str))
        saved = {"processes": 1, **json.loads(json.dumps(saved, default=str))}  # older checkpoints: one process
        changed = sorted(k for k in now.keys() | saved.keys() if now.get(k) != saved.get(k))
        if changed:
            raise ConfigError(
                "ckpt_path",
                f"the checkpoint was trained with other data settings ({', '.join(_option(c) for c in changed)}): "
                "resuming would not continue where it stopped. Use the checkpoint's settings, or "
                "--resume_changes allow if you mean it",
            )

    def val_dataloader(self) -> list[DataLoader]:
        """One dataloader per dataset, in the order of ``val_names``."""
        pairs = zip(self.val_sets, self.val_batches, strict=True)
        return [self._loader(ds, plan) for ds, plan in pairs]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    @property
    def seen_in_training(self) -> dict[str, bool]:
        """Per dataset: are its validation rows also training rows (so its loss is not held-out)?"""
        return {r["dataset"]: r["seen_in_training"] for r in self.summary}

    # -- summary -----------------------------------------------------------------------------------------------
    def _summarise(self) -> list[dict]:
        pad = [0] * len(self.prepared)
        slots = [0] * len(self.prepared)
        lengths = self.train_set.part_lengths()
        order = self.train_set.order
        # Packed rows hold no padding at all (padding share 0); padded batches pad to their longest sample.
        for plan in [] if self.packing else self.train_batches:
            batch = [order[i] for i in plan]
            longest = max(lengths[s][r] for s, r in batch)
            for s, r in batch:
                pad[s] += longest - lengths[s][r]
                slots[s] += longest
        rows = []
        for i, p in enumerate(self.prepared):
            reps = p.source.repeat
            rows.append(
                {
                    "dataset": p.source.name,
                    "train_rows": p.train_rows,
                    "repeat": reps,
                    "train_samples": len(p.train) * reps,
                    "train_tokens": sum(lengths[i]) * reps,
                    "truncated": sum(column(p.train, "truncated")) * reps
                    + (sum(column(p.val, "truncated")) if p.val is not None else 0),
                    "padding_share": pad[i] / slots[i] if slots[i] else 0.0,
                    "val_rows": p.val_rows,
                    "val_samples": len(p.val) if p.val is not None else 0,
                    "val_tokens": sum(column(p.val, "length")) if p.val is not None else 0,
                    "seen_in_training": p.seen_in_training,
                    "cached": p.from_cache,
                }
            )
        return rows

    def _print_summary(self) -> None:
        from rich.console import Console
        from rich.table import Table

        n_batches = self.train_batches_per_epoch()
        if self.packing:
            fill = sum(r["train_tokens"] for r in self.summary) / (n_batches * self.tokens_per_batch)
            batching = f"packed into {n_batches:,} batches of <= {self.tokens_per_batch:,} tokens ({fill:.1%} full)"
        else:
            batching = f"in {n_batches:,} batches of {self.batch_size}"
        world = self._ranks()[0]
        if world > 1:
            batching += f" per process, {world} processes (this is process 0's share)"
        title = f"data: {len(self.train_set):,} training samples {batching}, seed {self.seed}"
        table = Table(title=title, title_justify="left")
        heads = ["dataset", "train rows", "x", "train samples", "train tokens", "truncated", "padding", "val rows"]
        for h in [*heads, "val samples", "val tokens", "val seen in training", "cache"]:
            table.add_column(h, justify="left" if h == "dataset" else "right")
        for r in self.summary:
            table.add_row(
                r["dataset"],
                f"{r['train_rows']:,}",
                str(r["repeat"]),
                f"{r['train_samples']:,}",
                f"{r['train_tokens']:,}",
                f"{r['truncated']:,}",
                f"{r['padding_share']:.1%}",
                f"{r['val_rows']:,}" if r["val_samples"] else "none",
                f"{r['val_samples']:,}",
                f"{r['val_tokens']:,}",
                "YES" if r["seen_in_training"] else "no",
                "hit" if r["cached"] else "built",
            )
        Console(width=160).print(table)
        for r in self.summary:
            if r["seen_in_training"]:
                log.warning("validation rows of %s are also training rows: its loss is not held-out", r["dataset"])
            if not r["val_samples"]:
                log.warning("%s has no validation set (val_split is null)", r["dataset"])


def _split(batch: list[int], parts: int) -> list[list[int]]:
    """``batch`` in ``parts`` consecutive pieces whose sizes differ by at most one."""
    q, r = divmod(len(batch), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        out.append(batch[start:end])
        start = end
    return out


def _option(setting: str) -> str:
    """The option behind a data setting, for messages."""
    return "trainer.devices x trainer.num_nodes" if setting == "processes" else f"data.{setting}"
