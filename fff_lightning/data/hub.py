"""Hub datasets as files: a split's files found in (or downloaded to) the standard Hugging Face hub cache.

``datasets.load_dataset("<hub id>")`` offline only finds its own prepared cache from an earlier online call, so a
user who downloaded the repository on a login node (``hf download`` or ``python -m fff_lightning download``)
could not train on a node without network. Here a hub source is resolved to files with ``huggingface_hub``: online
the split's files are listed and downloaded into the hub cache (a file already there is not fetched again);
offline (``HF_HUB_OFFLINE=1``, or when the hub cannot be reached) the cached snapshot of the repository is read.
Either way the files are then read with the ``datasets`` json/parquet builders, so the same files serve both.

Which files make a split follows the ``datasets`` conventions: the dataset card's ``configs:`` (its default
config's ``data_files``), else the file-name patterns ``datasets`` infers (``data/train_sft-00000-of-00003-*``,
``train.jsonl``, or every data file as ``train``). A sharded split (``-00001-of-00003``) must have every shard.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fff_lightning.errors import ConfigError
from fff_lightning.files import offline  # noqa: F401  (hub.offline(), as the data code asks it)

log = logging.getLogger(__name__)
#: Data files a source may be made of, and the ``datasets`` builder that reads each.
DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<rest>[^/]*)$")


def cache() -> str:
    """The hub cache folder, read now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``huggingface_hub``'s default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def fetch_hint(repo: str) -> str:
    return (
        f"fetch it where the network is: `python -m fff_lightning download --config <this run's config>` "
        f"(or `hf download {repo} --repo-type dataset`), into the same hub cache (HF_HOME / HF_HUB_CACHE)"
    )


def card_splits(readme: str | None) -> dict[str, list[str]] | None:
    """``{split: patterns}`` of the dataset card's default config (``configs:`` in its YAML front matter), or
    ``None`` where the card names no data files."""
    import yaml

    if not readme or not readme.startswith("---"):
        return None
    front = readme.split("---", 2)
    try:
        meta = yaml.safe_load(front[1]) if len(front) == 3 else None
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    config = next((c for c in configs if isinstance(c, dict) and c.get("default")), None) or next(
        (c for c in configs if isinstance(c, dict) and c.get("config_name", "default") == "default"), None
    )
    if config is None:
        config = configs[0]
        if len(configs) > 1 and isinstance(config, dict):
            log.warning("data: the dataset card names %d configs and no default; reading its first, %r",
                        len(configs), config.get("config_name"))  # fmt: skip
    files = config.get("data_files") if isinstance(config, dict) else None
    if isinstance(files, str):
        files = [files]
    if isinstance(files, list) and files and all(isinstance(f, str) for f in files):
        return {"train": list(files)}
    if not isinstance(files, list):
        return None
    out: dict[str, list[str]] = {}
    for entry in files:
        if isinstance(entry, dict) and isinstance(entry.get("split"), str):
            path = entry.get("path", [])
            out.setdefault(entry["split"], []).extend([path] if isinstance(path, str) else list(path))
    return out or None


#: Files a dataset repository holds beside its data, which ``datasets`` never reads as rows.
METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "config.json", "state.json")


def _glob(pattern: str) -> re.Pattern:
    """fsspec's glob as ``datasets`` uses it: ``**`` any folders (none included), ``*`` and ``?`` within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out, i = out + "[" + pattern[i + 1 : end].replace("\\", "\\\\") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def matching(files: list[str], pattern: str) -> list[str]:
    """The data files among ``files`` (repository paths) that ``pattern`` names, as ``datasets`` resolves it:
    fsspec's glob, hidden (``.``) and ``__`` folders and metadata files left out."""
    rx = _glob(pattern)
    return sorted(
        f
        for f in files
        if PurePosixPath(f).suffix in DATA_SUFFIXES
        and PurePosixPath(f).name not in METADATA
        and not any(part.startswith((".", "__")) for part in PurePosixPath(f).parts)
        and rx.match(f)
    )


def split_patterns(files: list[str], readme: str | None) -> dict[str, list[str]]:
    """``{split: patterns}``: the card's, else what ``datasets`` infers from the file names."""
    from_card = card_splits(readme)
    if from_card:
        return from_card
    from datasets.data_files import _get_data_files_patterns  # the inference `load_dataset` itself runs

    try:
        return {str(k): v for k, v in _get_data_files_patterns(lambda p: matching(files, p)).items()}
    except FileNotFoundError:
        return {}


def split_files(repo: str, files: list[str], readme: str | None, split: str) -> list[str]:
    """The repository paths of ``split``'s files; a split the repository does not have is refused in one line."""
    patterns = split_patterns(files, readme)
    if split not in patterns:
        have = ", ".join(patterns) or "none"
        raise ConfigError("data.sources", f"{repo} has no split {split!r} (its splits: {have})")
    return sorted({f for p in patterns[split] for f in matching(files, p)})


def missing_shards(chosen: list[str]) -> list[str]:
    """Names of the shards a sharded split lacks (``...-00001-of-00003...`` present without ``-00000-``)."""
    groups: dict[tuple[str, int], set[int]] = {}
    for f in chosen:
        m = _SHARD.match(f)
        if m:
            groups.setdefault((m["stem"], int(m["n"])), set()).add(int(m["i"]))
    return [f"{stem}-{i:05d}-of-{n:05d}*" for (stem, n), have in groups.items() for i in range(n) if i not in have]


@dataclass
class HubSplit:
    """A split of a hub dataset as local files in the hub cache."""

    repo: str
    split: str
    files: list[Path]
    revision: str  # the snapshot's commit: part of the tokenized-data cache key


#: Seconds to wait for the hub before reading the cache instead (a proxy that never answers must not hang a run).
TIMEOUT = 10.0
_RESOLVED: dict[tuple[str, str, str], HubSplit] = {}


def resolve(repo: str, split: str) -> HubSplit:
    """``split`` of dataset ``repo`` as files in the hub cache: downloaded where the hub is reachable, else read
    from the cached snapshot; anything missing offline is one line naming the repository, the files and the
    command that fetches them. Resolved once per process (``prepare_data`` and ``setup`` both ask)."""
    key = (cache(), repo, split)
    if key not in _RESOLVED:
        _RESOLVED[key] = _resolve(repo, split)
    return _RESOLVED[key]


def _resolve(repo: str, split: str) -> HubSplit:
    from huggingface_hub.errors import RepositoryNotFoundError

    if not offline():
        try:
            return _online(repo, split)
        except ConfigError:
            raise
        except RepositoryNotFoundError as e:  # the hub answered: no such dataset, or gated/private without access
            raise ConfigError(
                "data.sources",
                f"{repo}: the hub has no dataset of that id you can read ({type(e).__name__}); check the id, or log "
                "in (`hf auth login`) and accept its terms if it is gated",
            ) from None
        except Exception as e:  # no network, hub down, proxy...: the cache may still hold it
            log.warning("data: cannot reach the hub for %s (%s); reading the hub cache", repo, type(e).__name__)
    return _cached(repo, split)


def _download(repo: str, path: str, revision: str | None = None) -> str:
    """One file into the hub cache, by the main branch (which records ``refs/main`` for offline runs)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, path, repo_type="dataset", revision=revision, cache_dir=cache(),
                           etag_timeout=TIMEOUT)  # fmt: skip


def _online(repo: str, split: str) -> HubSplit:
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(repo, timeout=TIMEOUT)
    files = [s.rfilename for s in info.siblings or []]
    readme = Path(_download(repo, "README.md")).read_text() if "README.md" in files else None
    chosen = split_files(repo, files, readme, split)
    if not chosen:
        raise ConfigError("data.sources", f"{repo} split {split!r}: no data file (.jsonl/.json/.parquet) on the hub")
    paths = [Path(_download(repo, f)) for f in chosen]
    return HubSplit(repo, split, paths, info.sha)


def snapshot(repo: str, kind: str = "dataset") -> Path | None:
    """The cached snapshot folder of ``repo``: the one ``refs/main`` names, else the newest. Read from the cache's
    layout directly: ``huggingface_hub`` refuses a snapshot that a partial ``hf download`` recorded as incomplete,
    though the files a run reads may all be there (they are checked one by one)."""
    root = Path(cache()) / f"{kind}s--{repo.replace('/', '--')}"
    ref = root / "refs" / "main"
    try:
        named = root / "snapshots" / ref.read_text().strip() if ref.is_file() else None
        if named is not None and named.is_dir():
            return named
        folders = [p for p in (root / "snapshots").iterdir() if p.is_dir()] if (root / "snapshots").is_dir() else []
    except OSError:
        return None
    return max(folders, key=lambda p: p.stat().st_mtime) if folders else None


def _cached(repo: str, split: str) -> HubSplit:
    folder = snapshot(repo)
    if folder is None:
        raise ConfigError("data.sources", f"{repo} is not in the hub cache ({cache()}); " + fetch_hint(repo))
    files = sorted(str(p.relative_to(folder).as_posix()) for p in folder.rglob("*") if p.is_file())
    readme = (folder / "README.md").read_text() if (folder / "README.md").is_file() else None
    if not matching(files, "**"):
        raise ConfigError(
            "data.sources", f"{repo}: no data file (.jsonl/.json/.parquet) in {folder}; " + fetch_hint(repo)
        )
    chosen = split_files(repo, files, readme, split)
    patterns = ", ".join(split_patterns(files, readme).get(split, []))
    if not chosen:
        where = f"{repo}: no file of split {split!r} ({patterns}) in {folder}"
        raise ConfigError("data.sources", f"{where}; " + fetch_hint(repo))
    lacking = missing_shards(chosen)
    if lacking:
        raise ConfigError(
            "data.sources", f"{repo} split {split!r} lacks {', '.join(lacking)} in {folder}; " + fetch_hint(repo)
        )
    return HubSplit(repo, split, [folder / f for f in chosen], folder.name)
