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
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", action="append", required=True, help="a run config, as `fit` takes it")
    p.add_argument("--dry-run", action="store_true", help="list the files, their sizes and what is cached; stop")
    p.epilog = "Any other option overrides the configs as it does for `fit`, e.g. --model.base.name_or_path <id>."
    return p


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _model_files(api, repo: str) -> tuple[list[tuple[str, int | None]], str]:
    from fnmatch import fnmatch

    info = api.model_info(repo, files_metadata=True)
    files = [(s.rfilename, s.size) for s in info.siblings or []]
    keep = [
        (f, n)
        for f, n in files
        if any(fnmatch(f, p) for p in MODEL_FILES) and not any(fnmatch(f, p) for p in MODEL_SKIP)
    ]
    return keep, info.sha


def plan(described) -> tuple[list[Item], list[str]]:
    """What the run needs from the hub (with sizes, from the hub's listing) and notes on what needs nothing."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    from fff_lightning import backends
    from fff_lightning.data import hub
    from fff_lightning.data.sources import resolve_path

    api = HfApi()
    items: list[Item] = []
    notes: list[str] = []
    model, dm = described.model, described.datamodule

    def cached(repo: str, path: str, kind: str, revision: str) -> bool:
        got = try_to_load_from_cache(repo, path, cache_dir=hub.cache(), revision=revision, repo_type=kind)
        return isinstance(got, str)

    repos = {}
    weights = backends.get(model.base.backend).hub_model(model.base)
    if weights is None:
        notes.append(f"the {model.base.backend} model is built on this machine: nothing to download")
    elif _is_hub_id(weights):
        repos[weights] = "the base model"
    else:
        notes.append(f"the base model is the local folder {weights}: nothing to download")
    tokenizer = dm.tokenizer_name
    if _is_hub_id(tokenizer) and tokenizer not in repos:
        repos[tokenizer] = "the tokenizer"
    for repo, why in repos.items():
        files, sha = _model_files(api, repo)
        items += [Item(repo, "model", f, n, cached(repo, f, "model", sha), why) for f, n in files]
    for src in dm.sources:
        builder, hub_id, _ = resolve_path(src)
        if builder != "hub":
            notes.append(f"{src.name}: {src.path} is local: nothing to download")
            continue
        info = api.dataset_info(hub_id, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        readme = None
        if "README.md" in sizes:
            readme = Path(hub._download(hub_id, "README.md", info.sha)).read_text()
        for split in dict.fromkeys(s for s in (src.train_split, src.val_split) if s):
            for f in hub.split_files(hub_id, list(sizes), readme, split):
                why = f"{src.name}, split {split}"
                items.append(Item(hub_id, "dataset", f, sizes[f], cached(hub_id, f, "dataset", info.sha), why))
    return items, notes


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def main(argv: list[str]) -> None:
    from fff_lightning.data import hub
    from fff_lightning.run_config import describe_run

    args, overrides = parser().parse_known_args(argv)
    if hub.offline():
        raise ConfigError(
            "download", "HF_HUB_OFFLINE is set: run `download` where the network is, without it, then train offline"
        )
    described = describe_run(*args.config, overrides=overrides)
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
