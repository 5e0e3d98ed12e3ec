"""Where each dataset comes from and which of its rows a run takes.

A source is a hub id (the real datasets are the defaults), a local file or folder (jsonl, json, parquet), or a
bundled sample (``bundled:metamath``). Rows are taken as the research did (``head``/``tail`` slices) or as a
seeded random sample, by count or fraction, then repeated ``repeat`` times for training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from fff_lightning.data.formatting import SCHEMA_COLUMNS
from fff_lightning.errors import ConfigError
from fff_lightning.spec import choice

TAKES = ("head", "tail", "random")
#: Stated bound of ``repeat`` (the research repeated one dataset 6 times).
MAX_REPEAT = 1000
#: A source's name is one word: it names the dataset in tables and its entry in the cache folder.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

BUNDLED = Path(__file__).parent / "samples"
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class SourceConfig:
    """One dataset of the mix.

    Attributes:
        name: the dataset's name in logs and tables (``metamath``...).
        path: hub id, local file or folder (jsonl/json/parquet), or ``bundled:<name>`` for bundled data: a sample
            (``bundled:metamath``) or the real data (``bundled:real/math``, with ``train`` and ``validation`` splits).
        schema: ``magicoder``, ``metamath``, ``ultrachat``, ``artificial_thinker`` or ``prompt_response``.
        train_split: split to train on.
        train_rows: rows to take for training: a count, a fraction in (0, 1], or ``None`` for all.
        train_take: ``head`` (first rows), ``tail`` (last rows) or ``random`` (seeded sample).
        val_split: split to validate on; ``None`` gives this dataset no validation (said in the summary).
        val_rows: rows to take for validation (count, fraction or ``None`` for all).
        val_take: ``head``, ``tail`` or ``random``.
        repeat: how many times the training rows appear in the mix (ArtificialThinkerSet: 6).
        enabled: ``false`` leaves the dataset out entirely.
        prompt_column: question column of a ``prompt_response`` source.
        response_column: answer column of a ``prompt_response`` source.
    """

    name: str
    path: str
    schema: str
    train_split: str = "train"
    train_rows: int | float | None = None
    train_take: str = "head"
    val_split: str | None = "train"
    val_rows: int | float | None = None
    val_take: str = "tail"
    repeat: int = 1
    enabled: bool = True
    prompt_column: str = "prompt"
    response_column: str = "response"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigError(
                "data.sources.name",
                f"{self.name!r}: a dataset name is letters, digits, '_', '-' and '.' (at most 64, starting with a "
                "letter or digit); it names the dataset's table row and cache entry",
            )
        f = f"data.sources.{self.name}"
        choice(f"{f}.schema", self.schema, tuple(SCHEMA_COLUMNS))
        for key in ("train_rows", "val_rows"):
            v = getattr(self, key)
            if isinstance(v, float) and v.is_integer() and v > 1:  # YAML/CLI parsers may hand counts over as floats
                v = int(v)
                setattr(self, key, v)
            if v is None:
                continue
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
            if bad or (isinstance(v, float) and v > 1):
                raise ConfigError(f"{f}.{key}", f"must be a positive count, a fraction in (0, 1], or null; got {v!r}")
        for key in ("train_take", "val_take"):
            choice(f"{f}.{key}", getattr(self, key), TAKES)
        if isinstance(self.repeat, bool) or not isinstance(self.repeat, int) or not 0 < self.repeat <= MAX_REPEAT:
            raise ConfigError(f"{f}.repeat", f"must be an int from 1 to {MAX_REPEAT}; got {self.repeat!r}")

    def columns(self) -> tuple[str, ...]:
        if self.schema == "prompt_response":
            return (self.prompt_column, self.response_column)
        return SCHEMA_COLUMNS[self.schema]


def research_sources() -> list[SourceConfig]:
    """The FFF study's mix (hub ids), in the order it concatenated them (which its shuffle depends on): its
    training slices, its per-dataset validation sets, ArtificialThinkerSet x6."""
    return [
        SourceConfig("metamath", "meta-math/MetaMathQA", "metamath", train_rows=10000, val_rows=1000),
        SourceConfig("magicoder", "ise-uiuc/Magicoder-OSS-Instruct-75K", "magicoder", train_rows=10000, val_rows=1000),
        SourceConfig(
            "ultrachat",
            "HuggingFaceH4/ultrachat_200k",
            "ultrachat",
            "train_sft",
            25000,
            "head",
            "test_sft",
            2000,
            "head",
        ),
        SourceConfig(
            "artificial_thinker", "freecs/ArtificialThinkerSet", "artificial_thinker", repeat=6, val_take="head"
        ),
    ]


def resolve_path(src: SourceConfig) -> tuple[str, str | None, list[str] | None]:
    """``(builder, hub_id, files)``: ``("json", None, [file])`` for local files, ``("hub", id, None)`` for the hub."""
    path = src.path
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        file, folder = BUNDLED / f"{name}.jsonl", BUNDLED / name
        inside = folder.resolve().is_relative_to(BUNDLED.resolve()) and ".." not in Path(name).parts
        if not inside or not (file.is_file() or (folder / "train.jsonl").is_file()):
            raise ConfigError(f"data.sources.{src.name}.path", f"no bundled data {path!r}; bundled: {bundled_names()}")
        if not file.is_file():  # a bundled folder: one file per split (train.jsonl, validation.jsonl)
            return "json", None, sorted(str(f) for f in folder.glob("*.jsonl"))
        return "json", None, [str(file)]
    p = Path(path)
    if p.is_file():
        if p.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(f"data.sources.{src.name}.path", f"{path}: use a .jsonl, .json or .parquet file")
        return LOCAL_SUFFIXES[p.suffix], None, [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ConfigError(f"data.sources.{src.name}.path", f"folder {path} holds no .jsonl/.json/.parquet file")
        builders = {LOCAL_SUFFIXES[Path(f).suffix] for f in files}
        if len(builders) > 1:
            raise ConfigError(f"data.sources.{src.name}.path", f"folder {path} mixes json and parquet files")
        return builders.pop(), None, files
    looks_local = path.startswith((".", "/", "~")) or Path(path).suffix in LOCAL_SUFFIXES or path.count("/") != 1
    if looks_local:
        raise ConfigError(f"data.sources.{src.name}.path", f"no such file or folder: {path}")
    return "hub", path, None


def bundled_names() -> list[str]:
    """What ``bundled:`` names: the samples (``metamath``...) and the real data's folders (``real/math``...)."""
    files = [p.stem for p in BUNDLED.glob("*.jsonl")]
    folders = [str(p.parent.relative_to(BUNDLED)) for p in BUNDLED.rglob("train.jsonl")]
    return sorted(files + folders)


def check_json_lines(file: str) -> None:
    """Name the file and line of the first malformed JSON line or undecodable byte, and refuse an empty file
    (``datasets`` reports neither file nor line)."""
    if Path(file).stat().st_size == 0:
        raise ConfigError("data", f"{file} is empty: give a file with rows")
    if not file.endswith(".jsonl"):
        return
    rows, blank = 0, None
    with open(file, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(
                    "data",
                    f"{file}, line {n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the file as UTF-8",
                ) from None
            if not line.strip():
                blank = blank or n
                continue
            if blank:
                raise ConfigError("data", f"{file}, line {blank}: a blank line between rows; remove it")
            rows += 1
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data", f"{file}, line {n}: malformed JSON ({e.msg})") from None
            except RecursionError:
                raise ConfigError("data", f"{file}, line {n}: nested too deeply to be a row") from None
    if not rows:
        raise ConfigError("data", f"{file} holds no row (only blank lines)")


def json_line_of(file: str, row: int) -> int | None:
    """The line number of the ``row``-th record (from 0) of a jsonl file: how a user finds a bad row."""
    if not file.endswith(".jsonl"):
        return None
    seen = -1
    with open(file, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return n
    return None


def pick(n_total: int, rows: int | float | None, take: str, seed: int) -> list[int]:
    """Row indices of a split to use: a count or fraction, from the head, the tail or a seeded sample."""
    n = n_total if rows is None else (round(rows * n_total) if isinstance(rows, float) else rows)
    if n > n_total:
        raise ValueError(f"asks for {n} rows but the split has {n_total}")
    if take == "head":
        return list(range(n))
    if take == "tail":
        return list(range(n_total - n, n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))
