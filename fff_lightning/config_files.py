"""The run configs shipped with the package (``configs/``, installed as ``fff_lightning.configs``), by name.

``--config quickstart`` (or ``step2``, ``overlays/packed``, with or without ``.yaml``) names a shipped config
wherever the tool is installed; an existing file of that path is always read first. ``python -m fff_lightning
configs`` lists them, ``configs --copy <folder>`` copies them out to edit, ``configs --reference [FILE]`` prints
(or writes) the reference of every option a run config takes (docs/config.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from fff_lightning.errors import ConfigError

PACKAGE = "fff_lightning.configs"


def folder() -> Path:
    """The shipped configs' folder (a real folder: setuptools installs package data as files)."""
    return Path(str(resources.files(PACKAGE)))


def names() -> list[str]:
    """The shipped configs, as ``--config`` takes them (``quickstart``, ``overlays/packed``...)."""
    root = folder()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def shipped(name: str | Path) -> Path | None:
    """The shipped config ``name`` names, or ``None``: an existing path is the user's file, never a shipped one."""
    name = str(name)
    if Path(name).exists():
        return None
    rel = name.removeprefix("configs/")
    rel = rel if rel.endswith((".yaml", ".yml")) else f"{rel}.yaml"
    path = folder() / rel
    if ".." in Path(rel).parts or not path.is_file():
        return None
    return path


def path(name: str | Path) -> Path:
    """A config's path: the file itself if it exists, else the shipped config of that name."""
    return shipped(name) or Path(name)


def resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value that names a shipped config replaced by its path."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = str(path(out[i + 1]))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(path(a.partition("=")[2]))
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fff_lightning configs", description=__doc__)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--copy", metavar="FOLDER", help="copy them into FOLDER (existing files are not overwritten)")
    what.add_argument(
        "--reference",
        metavar="FILE",
        nargs="?",
        const="-",
        help="print the reference of every option a run config takes (Markdown), or write it to FILE "
        "(the repository's docs/config.md is this)",
    )
    args = parser.parse_args(argv)
    if args.reference is not None:
        from fff_lightning import config_reference

        text = config_reference.reference()
        if args.reference == "-":
            sys.stdout.write(text)
            return
        from fff_lightning.files import write_text

        write_text(args.reference, text)
        print(f"wrote {args.reference}")
        return
    if args.copy is None:
        print(f"shipped configs (in {folder()}); use them as --config <name>:")
        for n in names():
            print(f"  {n}")
        return
    dest = Path(args.copy)
    try:
        copied = 0
        for n in names():
            target = dest / f"{n}.yaml"
            if target.exists():
                print(f"kept {target} (exists)", file=sys.stderr)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder() / f"{n}.yaml", target)
            copied += 1
    except OSError as e:
        raise ConfigError("copy", f"cannot write to {dest} ({e.strerror})") from None
    print(f"{copied} configs copied to {dest}")
