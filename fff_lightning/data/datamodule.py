"""``FFFDataModule``: the research's four-dataset mix, exact and reproducible, validated per dataset."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from fff_lightning.data.formatting import LOSS_ON, TEXT_STYLES
from fff_lightning.data.prepare import Prepared, TextOptions, prepare_source
from fff_lightning.data.sources import SourceConfig, research_sources
from fff_lightning.errors import ConfigError

log = logging.getLogger(__name__)
IGNORE = -100


class TokenizedRows(Dataset):
    """Rows of several tokenized datasets in a fixed order: ``order[i] = (source index, row index)``."""

    def __init__(self, parts: list, order: list[tuple[int, int]]):
        self.parts = parts
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        s, r = self.order[i]
        row = self.parts[s][r]
        return {"input_ids": row["input_ids"], "labels": row["labels"], "source": s}


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``(B, longest)`` tensor of the sequences, padded with ``value`` on the right (or the left)."""
    n = max(len(x) for x in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, x in enumerate(seqs):
        if left:
            out[i, n - len(x) :] = torch.tensor(x, dtype=torch.long)
        else:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


class PadCollator:
    """Right-pads a batch to its longest sample; padded labels are -100 and masked out of attention."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id),
            "labels": pad([r["labels"] for r in rows], IGNORE),
            "attention_mask": pad([[1] * len(x) for x in ids], 0),
            "source": torch.tensor([r["source"] for r in rows]),
        }


class ResumableBatchSampler(BatchSampler):
    """Batches in order; after a mid-epoch resume, the first ``skip`` batches of the next pass are left out.

    Its length stays the full epoch's, as Lightning expects of a resumed loader (it counts the restored batches
    itself), so the schedule's total steps do not change on resume.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False, skip: int = 0):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly (no "not resumable" warning).

    The position itself travels in the data module's checkpoint state (``batches_done_in_epoch``, read from
    Lightning's own batch progress, which is exact even though Lightning prefetches a batch) and reaches the
    loader as its batch sampler's ``skip``; the loader has no state of its own to add.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PromptRows(Dataset):
    """Prompts to answer in ``predict``, formatted like the training samples up to the answer."""

    def __init__(self, prompts: list[str], tokenizer, style: str, template: str | None):
        self.prompts = prompts
        self.tokenizer, self.style, self.template = tokenizer, style, template

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        p = self.prompts[i]
        if self.style == "research":
            text = f"###USER: {p}\n###ASSISTANT:"
        else:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
            text = text.removeprefix(self.tokenizer.bos_token or "")
        return {"input_ids": self.tokenizer(text)["input_ids"], "prompt": p}


class LeftPadCollator:
    """Left-pads prompts so generation continues each one from its last token."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id, left=True),
            "attention_mask": pad([[1] * len(x) for x in ids], 0, left=True),
            "prompt": [r["prompt"] for r in rows],
        }


def read_prompts(path: str) -> list[str]:
    """Prompts from a ``.jsonl`` file (a ``prompt`` field per line) or a text file (one prompt per line)."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.predict_file", f"no such file: {path}")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.predict_file", f"{path}, line {n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError("data.predict_file", f"{path}, line {n}: needs a text field 'prompt'")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError("data.predict_file", f"{path} holds no prompt")
    return prompts


def mix_order(lengths: list[int], repeats: list[int], seed: int) -> list[tuple[int, int]]:
    """Every training row of every source, ``repeat`` times, shuffled once with ``seed`` (the research's mix)."""
    order = [(s, r) for s, (n, k) in enumerate(zip(lengths, repeats, strict=True)) for _ in range(k) for r in range(n)]
    random.Random(seed).shuffle(order)
    return order


def group_by_length(order: list, length_of, batch_size: int, seed: int, mega: int = 50) -> list:
    """Reorder so each batch holds samples of similar length (less padding), keeping the mix random: sort within
    mega-batches of ``mega * batch_size`` samples, cut into batches, shuffle the batches with ``seed``."""
    size = mega * batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=length_of, reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return [x for b in batches for x in b]


class FFFDataModule(L.LightningDataModule):
    """The training mix and one named validation set per dataset.

    Args:
        sources: the datasets (default: the research's four, from the hub).
        paths: ``{name: path}`` to point a source at a local file or folder from the command line, e.g.
            ``--data.paths '{metamath: data/mm.jsonl}'``.
        text_style: ``research`` (``###USER: ...\\n###ASSISTANT: ...``) or ``chat_template``.
        loss_on: ``all`` tokens (the research) or ``assistant`` tokens only.
        chat_template: a Jinja chat template for ``chat_template`` style (default: the tokenizer's own).
        max_seq_length: longer samples are truncated (and counted).
        batch_size: training micro-batch size.
        val_batch_size: validation batch size (default: ``batch_size``).
        num_workers: dataloader workers; batches do not depend on it.
        seed: selects random takes and shuffles the mix (the research used 12).
        group_by_length: batch samples of similar length together to cut padding (seeded).
        tokenizer: tokenizer hub id or folder; ``None``: Mistral-7B's, offline.
        cache_dir: where tokenized data is cached (default ``$FFF_CACHE/data``); ``None`` with ``cache: false``
            disables the cache.
        cache: reuse tokenized data keyed by everything that changes it.
        num_proc: processes for tokenization (``datasets.map``).
        predict_file: prompts for ``predict``: ``.jsonl`` with a ``prompt`` field, or one prompt per line.
    """

    def __init__(
        self,
        sources: list[SourceConfig] | None = None,
        paths: dict[str, str] | None = None,
        text_style: str = "research",
        loss_on: str = "all",
        chat_template: str | None = None,
        max_seq_length: int = 2048,
        batch_size: int = 3,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 12,
        group_by_length: bool = False,
        tokenizer: str | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
        num_proc: int | None = None,
        predict_file: str | None = None,
    ):
        super().__init__()
        if text_style not in TEXT_STYLES:
            raise ConfigError("data.text_style", f"unknown style {text_style!r}; allowed: {', '.join(TEXT_STYLES)}")
        if loss_on not in LOSS_ON:
            raise ConfigError("data.loss_on", f"unknown value {loss_on!r}; allowed: {', '.join(LOSS_ON)}")
        for name, v in (("max_seq_length", max_seq_length), ("batch_size", batch_size)):
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"data.{name}", f"must be a positive int; got {v!r}")
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
        self.opts = TextOptions(text_style, loss_on, max_seq_length, chat_template)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.group = group_by_length
        self.tokenizer_name = tokenizer
        self.cache_dir = cache_dir
        self.cache = cache
        self.num_proc = num_proc
        self.predict_file = predict_file
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
        from fff_lightning.tokenizer import cache_dir

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
            self.predict_set = PromptRows(
                read_prompts(self.predict_file or ""), self.tokenizer, self.opts.style, self.opts.chat_template
            )
            return
        if self.prepared:
            return
        self.prepared = self._prepare_all()
        parts = [p.train for p in self.prepared]
        order = mix_order([len(p) for p in parts], [p.source.repeat for p in self.prepared], self.seed)
        if self.group:
            lengths = [p["length"] for p in parts]
            order = group_by_length(order, lambda x: lengths[x[0]][x[1]], self.batch_size, self.seed)
        self.train_set = TokenizedRows(parts, order)
        self.val_sets = [
            TokenizedRows([p.val], [(0, r) for r in range(len(p.val))]) for p in self.prepared if p.val is not None
        ]
        self.val_names = [p.source.name for p in self.prepared if p.val is not None]
        self.summary = self._summarise()
        self._print_summary()

    # -- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, batch_size: int, skip: int = 0, collate=None) -> DataLoader:
        # The order is fixed in setup(), so batches do not depend on workers or processes.
        return ResumableLoader(
            ds,
            batch_sampler=ResumableBatchSampler(SequentialSampler(ds), batch_size, skip=skip),
            num_workers=self.num_workers,
            collate_fn=collate or PadCollator(self.tokenizer.pad_token_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        skip, self._skip = self._skip, 0
        return self._loader(self.train_set, self.batch_size, skip=skip)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.val_batch_size, collate=LeftPadCollator(self.tokenizer.pad_token_id))

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints: how many batches of the current epoch were trained on."""
        trainer = self.trainer
        if trainer is None or not hasattr(self, "train_set"):
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        return {"batches_done_in_epoch": done % per_epoch, "seed": self.seed, "train_samples": len(self.train_set)}

    def load_state_dict(self, state: dict) -> None:
        self._skip = int(state.get("batches_done_in_epoch", 0))

    def val_dataloader(self) -> list[DataLoader]:
        """One dataloader per dataset, in the order of ``val_names``."""
        return [self._loader(ds, self.val_batch_size) for ds in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    # -- summary -----------------------------------------------------------------------------------------------
    def _summarise(self) -> list[dict]:
        pad = [0] * len(self.prepared)
        slots = [0] * len(self.prepared)
        lengths = [p.train["length"] for p in self.prepared]
        order = self.train_set.order
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
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
                    "truncated": sum(p.train["truncated"]) * reps
                    + (sum(p.val["truncated"]) if p.val is not None else 0),
                    "padding_share": pad[i] / slots[i] if slots[i] else 0.0,
                    "val_rows": p.val_rows,
                    "val_samples": len(p.val) if p.val is not None else 0,
                    "val_tokens": sum(p.val["length"]) if p.val is not None else 0,
                    "seen_in_training": p.seen_in_training,
                    "cached": p.from_cache,
                }
            )
        return rows

    def _print_summary(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"data: {len(self.train_set):,} training samples, seed {self.seed}", title_justify="left")
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
