"""Files that must never be half-written: every file and folder fff_lightning writes goes through here.

A file is written beside its destination and renamed over it in one step (``os.replace``), so a crash, a kill or
a full disk leaves either the old file or the new one, never a truncated mix; a folder likewise. Temporary names
carry the writer's process id, so leftovers of a killed writer are recognised and removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from fff_lightning.errors import ConfigError

#: errno values that mean "this place cannot be written" (read-only, no permission, a file where a folder should be).
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def not_writable(dest: Path, e: OSError) -> ConfigError:
    """The one-line error for a place that cannot be written, saying which setting moves it."""
    try:
        in_cache = Path(dest).resolve().is_relative_to(cache_dir().resolve())
    except OSError:
        in_cache = False
    field, hint = ("FFF_CACHE", "set FFF_CACHE to a folder you can write to") if in_cache else (
        "output", "choose a folder you can write to")  # fmt: skip
    return ConfigError(field, f"cannot write {dest} ({e.strerror or type(e).__name__}): {hint}")


def cache_dir() -> Path:
    """Where fff_lightning keeps what it builds once (tokenizer folder, tiny models, tokenized data):
    ``$FFF_CACHE`` or ``~/.cache/fff_lightning``."""
    return Path(os.environ.get("FFF_CACHE", Path.home() / ".cache" / "fff_lightning"))


def _tmp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp{os.getpid()}."


def remove_stale(parent: Path) -> None:
    """Remove temporary files and folders left in ``parent`` by writers that no longer run (a ``kill -9``)."""
    if not parent.is_dir():
        return
    for p in parent.glob(".*.tmp*.*"):
        pid = p.name.rsplit(".tmp", 1)[-1].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomically(dest: Path, build, replace: bool = False) -> Path:
    """Run ``build(tmp_folder)`` beside ``dest`` and move the result to ``dest`` in one rename, so a crash leaves no
    half-written folder. An existing ``dest`` is kept (another process finished first) unless ``replace``."""
    dest = Path(dest)
    if dest.exists() and not replace:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest.parent)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_tmp_prefix(dest)))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(dest) from e
        if e.errno in _UNWRITABLE:
            raise not_writable(dest.parent, e) from None
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's is private (0700); the folder gets a plain mkdir's mode
        try:
            build(tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(dest) from e
            raise
        if replace and dest.exists():
            old = dest.with_name(f"{_tmp_prefix(dest)}old")
            os.replace(dest, old)  # out of the way in one step, removed once the new one is in place
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, dest)
            except OSError:  # another process finished first
                if not dest.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w"):
    """``with atomic_file(path) as fh: fh.write(...)``: the file appears whole at ``path``, or not at all (the old
    one, if any, stays). Raises :class:`DiskFullError` naming the file when the disk fills up."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=_tmp_prefix(dest))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(dest) from e
        if e.errno in _UNWRITABLE:
            raise not_writable(dest.parent, e) from None
        raise
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's is private (0600); the file gets a plain open()'s mode
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(dest) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read once (setting it to read it back is not thread-safe, so not done per file)."""
    global _UMASK
    if _UMASK is None:
        try:
            status = Path("/proc/self/status").read_text()
            _UMASK = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def write_text(dest: str | Path, text: str) -> Path:
    with atomic_file(dest, "w") as fh:
        fh.write(text)
    return Path(dest)


class DiskFullError(OSError):
    """The disk filled up while writing ``path``; the file that was there before is intact."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {path}; the earlier file is intact")
        self.path = path


def offline(variable: str = "HF_HUB_OFFLINE") -> bool:
    """Whether the network must not be used for models and data (``HF_HUB_OFFLINE``; ``variable``: another of
    Hugging Face's flags, e.g. ``HF_DATASETS_OFFLINE``), read now, not at import."""
    return os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on")


def open_lock_file(path: Path, field: str = "logs_dir") -> int:
    """Open (creating it if need be) the lock file ``path`` for reading and writing, never through a link: a
    symbolic link or anything but a regular file there is refused in one line, and nothing it points to is opened
    (a lock file is truncated to write its holder's pid)."""
    import stat

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(field, f"{path} is a symbolic link: a lock file must be a plain file (remove the "
                              "link)") from None  # fmt: skip
        if e.errno == errno.EISDIR:
            raise ConfigError(field, f"{path} is not a plain file: remove it") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(field, f"{path} is not a plain file: remove it")
    return fd
