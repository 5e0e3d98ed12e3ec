"""Load, select, format and tokenize one source, with a cache keyed by everything that changes the result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fff_lightning.data.formatting import formatter, tokenize_sample
from fff_lightning.data.sources import (
    LOCAL_SUFFIXES,
    SourceConfig,
    check_json_lines,
    json_line_of,
    pick,
    resolve_path,
)
from fff_lightning.errors import ConfigError
from fff_lightning.files import write_atomically

log = logging.getLogger(__name__)
#: Bump when formatting or tokenization changes, so old caches are not reused.
#: Cache entries this process wrote: the summary says "built" for them, not "hit", though setup reads them back.
BUILT: set[str] = set()
CACHE_VERSION = 4  # 2: the research's dialogue newlines, SentencePiece ids, eos and system_turns options; 3: meta.json;
#  4: chat templates: spans between the template's fragments, the end-of-turn token scored, BOS kept unless added


@dataclass
class TextOptions:
    """How samples become tokens; part of every cache key."""

    style: str
    loss_on: str
    max_seq_length: int
    chat_template: str | None
    eos: bool = True
    system_turns: str = "prepend"


@dataclass
class Prepared:
    """One source after preparation: tokenized train and validation sets, and what is known about them."""

    source: SourceConfig
    train: object  # datasets.Dataset with input_ids, labels, truncated, length
    val: object | None
    train_rows: int  # rows taken before repeat and before UltraChat's expansion into turns
    val_rows: int
    seen_in_training: bool  # validation rows are also training rows
    from_cache: bool


#: Fingerprints already taken, by tokenizer object (a run's sources share one tokenizer; hashing its vocabulary
#: takes a quarter of a second): ``id -> (weak reference, vocabulary size, fingerprint)``.
_FINGERPRINTS: dict[int, tuple] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenized-data cache keys on: the tokenizer's vocabulary, special tokens and how it splits a probe;
    taken once per tokenizer object (and again if its vocabulary grows)."""
    import weakref

    seen = _FINGERPRINTS.get(id(tokenizer))
    if seen is not None and seen[0]() is tokenizer and seen[1] == len(tokenizer):
        return seen[2]
    try:
        ref = weakref.ref(tokenizer)
    except TypeError:  # an object that takes no weak reference: fingerprinted every time
        ref = None
    fingerprint = _fingerprint(tokenizer)
    if ref is not None:
        _FINGERPRINTS[id(tokenizer)] = (ref, len(tokenizer), fingerprint)
    return fingerprint


def _fingerprint(tokenizer) -> str:
    from fff_lightning.tokenizer import encode

    probe = "###USER: Hello,  world!\n###ASSISTANT:    42 is ▁the answer."
    name = str(getattr(tokenizer, "name_or_path", ""))
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    data = [
        "local" if Path(name).is_dir() else name,  # a folder's place is not its content: moving it keeps the cache
        vocab,
        len(tokenizer),
        tokenizer.eos_token_id,
        tokenizer(probe)["input_ids"],
        encode(tokenizer, probe)[0],
    ]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def _load_split(files: list[str], src: SourceConfig):
    """One split's rows, read from its files (local files, or a hub split's files in the hub cache)."""
    import datasets

    kinds = {LOCAL_SUFFIXES[Path(f).suffix] for f in files}
    if len(kinds) != 1:
        raise ConfigError(f"data.sources.{src.name}.path", f"{src.path}: a split mixes json and parquet files")
    for f in files:
        check_json_lines(f)
    try:
        return datasets.load_dataset(kinds.pop(), data_files=files, split="train")
    except Exception as e:
        raise ConfigError(f"data.sources.{src.name}.path", f"cannot read {files} ({type(e).__name__}: {e})") from e


def split_files(files: list[str], split: str) -> list[str]:
    """A local folder may hold one file per split (``train_sft.jsonl``, ``test_sft.jsonl``); otherwise every
    split name refers to all of its files."""
    return [f for f in files if Path(f).stem == split] or files


def _check_columns(ds, src: SourceConfig) -> None:
    missing = [c for c in src.columns() if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"data.sources.{src.name}",
            f"schema {src.schema!r} needs column(s) {missing}, which {src.path} lacks; it has {ds.column_names}",
        )


def _tokenize(ds, src: SourceConfig, tokenizer, opts: TextOptions, num_proc: int | None, what: str, key: str, where):
    """``where(i)`` names row ``i`` of ``ds`` for a user: file and line where there is one."""
    fmt = formatter(src.schema, src.prompt_column, src.response_column, opts.system_turns)

    def batch_fn(batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "labels": [], "truncated": [], "length": []}
        for j, i in enumerate(indices):
            row = {k: v[j] for k, v in batch.items()}
            try:
                samples = fmt(row)
            except (TypeError, KeyError) as e:
                raise ConfigError(f"data.sources.{src.name}", f"{where(i)}: {e}") from None
            for s in samples:
                try:
                    t = tokenize_sample(
                        s, tokenizer, opts.style, opts.loss_on, opts.max_seq_length, opts.chat_template, opts.eos
                    )
                except ValueError as e:  # a chat template that cannot render the row as the data has it
                    raise ConfigError(f"data.sources.{src.name}", f"{where(i)}: {e}") from None
                for k in ("input_ids", "labels", "truncated"):
                    out[k].append(t[k])
                out["length"].append(len(t["input_ids"]))
        return out

    return ds.map(
        batch_fn,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc and num_proc > 1 and len(ds) >= 2 * num_proc else None,
        desc=f"tokenizing {src.name} ({what})",
        load_from_cache_file=False,
        new_fingerprint=f"{key}-{what}",  # our key says it all; hashing the tokenizer-holding closure costs seconds
    )


@contextlib.contextmanager
def _quiet():
    """No progress bars for cache writes: the tokenizing bars are the ones that tell something."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if was:
            enable_progress_bar()


def _local_fingerprint(files: list[str]) -> list:
    return [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]


def _hub_fingerprint(split) -> list:
    """A hub split's files by content: the cache's blob names are their hashes (a re-download keeps them)."""
    return [split.repo, [(f.name, f.resolve().name, f.stat().st_size) for f in split.files]]


def _read_cached(folder: Path | None, src: SourceConfig) -> Prepared | None:
    """The cache entry in ``folder``, if it is complete and readable: no raw data is read on a hit."""
    import datasets

    if folder is None or not (folder / "done").exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        train = datasets.load_from_disk(str(folder / "train"))
        val = datasets.load_from_disk(str(folder / "val")) if meta["val_rows"] else None  # a lost val/ fails here
        if len(train) == 0 or (val is not None and len(val) == 0):
            raise ValueError("an empty part")
        for part in (train, val):  # read the last row of each: a truncated file fails here, not mid-training
            if part is not None and len(part):
                part[len(part) - 1]
        hit = str(folder) not in BUILT
        return Prepared(src, train, val, meta["train_rows"], meta["val_rows"], meta["seen"], from_cache=hit)
    except Exception as e:  # a damaged entry (disk error, a file deleted by hand): say so, then rebuild it
        log.warning("tokenized-data cache entry %s is damaged (%s): rebuilding it", folder, type(e).__name__)
        return None


def prepare_source(
    src: SourceConfig, tokenizer, opts: TextOptions, seed: int, cache_root: Path | None, num_proc: int | None
) -> Prepared:
    """Everything for one source; reads the cache when the key matches (without reading the raw data), writes it
    atomically otherwise."""
    import datasets

    from fff_lightning.data import hub

    builder, hub_id, files = resolve_path(src)
    same_split = src.val_split == src.train_split
    splits = [src.train_split] + ([src.val_split] if src.val_split is not None and not same_split else [])
    if builder == "hub":  # each split's files in the hub cache (downloaded first where the hub is reachable)
        resolved = {s: hub.resolve(hub_id, s) for s in splits}
        split_of = {s: [str(f) for f in r.files] for s, r in resolved.items()}
        data = [_hub_fingerprint(r) for r in resolved.values()]
    else:
        split_of = {s: split_files(files, s) for s in splits}
        named = [s for s in splits if any(Path(f).stem == s for f in files)]
        if named and len(named) < len(splits):  # one split has its file, another would take every file, its own too
            other = next(s for s in splits if s not in named)
            raise ConfigError(
                f"data.sources.{src.name}",
                f"{src.path} holds a file for split {named[0]!r} but none named {other!r} "
                f"(files: {', '.join(Path(f).name for f in files)}); name it {other}.jsonl, or set the split to a "
                "file's name",
            )
        data = _local_fingerprint(files)
    key_data = {
        "version": CACHE_VERSION,
        "source": {k: v for k, v in asdict(src).items() if k not in ("repeat", "enabled", "name")},
        "data": data,
        "text": asdict(opts),
        "seed": seed if "random" in (src.train_take, src.val_take) else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
    folder = cache_root / f"{src.name}-{key}" if cache_root else None
    cached = _read_cached(folder, src)
    if cached is not None:
        return cached

    train_raw = _load_split(split_of[src.train_split], src)
    _check_columns(train_raw, src)
    val_raw = None
    if src.val_split is not None:
        val_raw = train_raw if same_split else _load_split(split_of[src.val_split], src)
        _check_columns(val_raw, src)

    try:
        train_idx = pick(len(train_raw), src.train_rows, src.train_take, seed)
        val_idx = pick(len(val_raw), src.val_rows, src.val_take, seed + 1) if val_raw is not None else []
    except ValueError as e:
        raise ConfigError(f"data.sources.{src.name}", str(e)) from None
    if not train_idx:
        raise ConfigError(f"data.sources.{src.name}.train_rows", f"selects no training row from {src.path}")
    if val_raw is not None and not val_idx:
        raise ConfigError(f"data.sources.{src.name}.val_rows", f"selects no validation row from {src.path}")
    # Validation rows that are also training rows (ArtificialThinkerSet in the research) are allowed, but recorded.
    same_rows = same_split or (val_raw is not None and split_of[src.train_split] == split_of[src.val_split])
    seen = bool(same_rows and set(train_idx) & set(val_idx))

    def where(split: str, idx: list[int]):
        one = split_of[split]
        if len(one) == 1 and one[0].endswith(".jsonl"):
            return lambda i: f"{one[0]}, line {json_line_of(one[0], idx[i])}"
        return lambda i: f"{split} row {idx[i]}"

    train = _tokenize(
        train_raw.select(train_idx),
        src,
        tokenizer,
        opts,
        num_proc,
        "train",
        key,
        where(src.train_split, train_idx),
    )
    val = (
        _tokenize(val_raw.select(val_idx), src, tokenizer, opts, num_proc, "val", key, where(src.val_split, val_idx))
        if val_raw is not None
        else None
    )
    if folder is not None:

        def write(tmp: Path) -> None:
            with _quiet():
                train.save_to_disk(str(tmp / "train"))
                if val is not None:
                    val.save_to_disk(str(tmp / "val"))
            (tmp / "key.json").write_text(json.dumps(key_data, indent=2, default=str))
            meta = {"train_rows": len(train_idx), "val_rows": len(val_idx), "seen": seen}
            (tmp / "meta.json").write_text(json.dumps(meta))
            (tmp / "done").touch()

        write_atomically(folder, write, replace=True)  # a folder without "done" is a crashed write: replaced
        BUILT.add(str(folder))
        train = datasets.load_from_disk(str(folder / "train"))
        val = datasets.load_from_disk(str(folder / "val")) if val is not None else None
    return Prepared(src, train, val, len(train_idx), len(val_idx), seen, from_cache=False)
