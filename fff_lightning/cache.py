"""What fff_lightning builds once and keeps: where it lives, and how a folder is written so no crash leaves half."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where fff_lightning keeps what it builds once (tokenizer folder, tiny models, tokenized data):
    ``$FFF_CACHE`` or ``~/.cache/fff_lightning``."""
    return Path(os.environ.get("FFF_CACHE", Path.home() / ".cache" / "fff_lightning"))


def write_atomically(dest: Path, build, replace: bool = False) -> Path:
    """Run ``build(tmp_folder)`` beside ``dest`` and move the result to ``dest`` in one rename, so a crash leaves no
    half-written folder. An existing ``dest`` is kept (another process finished first) unless ``replace``."""
    dest = Path(dest)
    if dest.exists() and not replace:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        build(tmp)
        if replace and dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
