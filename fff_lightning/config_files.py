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
    """``argv`` with each ``--config``/``-c`` value that names a shipped config replaced by its path, each checked
    (:func:`checked`) before any parser reads it."""
    out = list(argv)
    for i, a in enumerate(out):
        if a in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = checked(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + checked(a.partition("=")[2])
    return out


#: A YAML file larger than this is refused unread (the largest shipped config is a few KiB).
MAX_BYTES = 10 << 20
#: The most values (YAML nodes) a document may hold once its aliases are expanded.
MAX_NODES = 1_000_000


def checked(value: str) -> str:
    """A ``--config`` value as the parser should read it: a file (checked by :func:`check_yaml_file`), a shipped
    config's path, or a config written inline (``--config '{model: {lr: 0.1}}'``, checked as a file is); a name that
    is none of these is refused, pointing to the list of shipped configs."""
    found = path(value)
    if found.is_file():
        check_yaml_file(found)
        return str(found)
    if found.exists():  # a folder, a device: the parser says what it needs
        return str(found)
    node = check_yaml_text(value, "--config") if any(c in value for c in ":{[\n") else None
    if node is not None and node.tag.endswith(":map"):
        return value
    import difflib

    close = difflib.get_close_matches(value.removeprefix("configs/").removesuffix(".yaml"), names(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        "config",
        f"File does not exist: {str(Path(value).absolute())!r}, and no shipped config is named {value!r}{hint}: "
        "`python -m fff_lightning configs` lists them",
    )


def check_yaml_file(file: str | Path) -> None:
    """Refuse a YAML file before any parser reads it: larger than :data:`MAX_BYTES`, not UTF-8, not valid YAML
    (``<file>:<line>:<col>: not valid YAML: ...``), or whose aliases expand to more than :data:`MAX_NODES` values
    (a "billion laughs" document of a few hundred bytes that takes gigabytes to read). Only regular files are read
    here; anything else is left to the reader, which refuses it."""
    file = Path(file)
    if not file.is_file():
        return
    size = file.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(
            str(file), f"{size / 2**20:.1f} MiB: a YAML config is at most {MAX_BYTES >> 20} MiB; refused unread"
        )
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConfigError(str(file), f"cannot read it ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{file}:{line}", f"not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    if _digest(text) not in _SOUND:  # the same file, read again by the run's parser
        check_yaml_text(text, str(file))


#: Digests of the YAML texts this process has composed and found sound: a config file is read by the command line's
#: check, by the run's parser and by jsonargparse's loader, and composed once.
_SOUND: set[bytes] = set()


def _digest(text: str) -> bytes:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def check_yaml_text(text: str, where: str):
    """The YAML document ``text`` composed (its nodes, nothing constructed), or a :class:`ConfigError` naming
    ``where`` (a file) and the line if it is not valid YAML or its aliases expand to too many values."""
    import yaml

    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "unreadable"
        if e.problem and e.context:
            at = e.context_mark
            problem += f" ({e.context}" + (f" at line {at.line + 1}, column {at.column + 1})" if at else ")")
        where = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(where, f"not valid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(where, f"not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if node is not None:
        check_expansion(node, where)
    _SOUND.add(_digest(text))
    return node


def check_value(text: str) -> None:
    """Refuse a YAML value (a config file's text, an option's value) whose aliases expand to too many values; one
    that is not valid YAML is left to its reader. A text found sound before (a checked config file) is not read
    again."""
    import yaml

    if _digest(text) in _SOUND:
        return
    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return
    if node is not None:
        check_expansion(node, "a YAML value")
    _SOUND.add(_digest(text))


def check_expansion(root, where: str) -> None:
    """Refuse a composed YAML document that holds more than :data:`MAX_NODES` values once every alias is expanded,
    or an alias inside the value it names (a value that contains itself). Each node is counted once (memoised, an
    iterative walk: no recursion), and the walk stops at the first value over the limit, the deepest such."""
    counts: dict[int, int] = {}
    open_ = set()  # the nodes whose values are being counted: the current node's ancestors
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = _children(node)
        if children_done:
            open_.discard(key)
            total = 1 + sum(counts[id(k)] for k in kids)
            counts[key] = total
            if total > MAX_NODES:
                m = node.start_mark
                if len(counts) > MAX_NODES:  # no alias needed to get there: simply a huge document
                    raise ConfigError(where, f"holds more than {MAX_NODES:,} values: not a run config; refused")
                raise ConfigError(
                    where,
                    f"its YAML aliases (*name) expand to more than {MAX_NODES:,} values (the value at line "
                    f"{m.line + 1}, column {m.column + 1} alone to {total:,}): refused before it is read",
                )
            continue
        if key in counts:
            continue
        if key in open_:
            m = node.start_mark
            raise ConfigError(
                where, f"the value at line {m.line + 1}, column {m.column + 1} contains an alias of itself: refused"
            )
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in counts)


def _children(node) -> list:
    value = node.value
    if not isinstance(value, list):
        return []
    if value and isinstance(value[0], tuple):  # a mapping: (key, value) pairs
        return [n for pair in value for n in pair]
    return value


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fff_lightning configs", description=__doc__, allow_abbrev=False)
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
