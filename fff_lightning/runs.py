"""Where a run's files go: its name, its folder under ``<logs_dir>/<experiment>/``, and the predictions file.

A trained run's folder holds its TensorBoard events, checkpoints, exported adapters and validation table;
``validate``/``test``/``predict`` write into the folder of the run they evaluate (found from the adapter folder
or checkpoint), into ``--out_dir`` when given, else into ``<run>-<command>``.

A folder a process trains in is claimed in one step (``mkdir``) and locked for as long as that process lives
(``flock`` on ``<run>/.lock``, released by the system even after ``kill -9``): a second run, a resume or a sweep
that would use or rename it while it is in use is refused instead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.files import open_lock_file
from fff_lightning.spec import AdapterSpec

LOCK = ".lock"
#: A name that becomes one folder: no separator, not "." or "..", no leading dot (hidden files are ours).
_NAME = re.compile(r"[^/\\\x00-\x1f]{1,200}")
#: The most bytes a name may take (file systems allow 255 per name; suffixes such as ``-validate`` or ``.failed-1``
#: are added to it).
NAME_BYTES = 200


def check_name(field: str, name: str) -> str:
    """Refuse a name that would not be exactly one folder inside its parent (``../x``, ``a/b``, ``.``), or too long
    for a file system (200 bytes in UTF-8: 100 CJK characters are 300)."""
    ok = isinstance(name, str) and _NAME.fullmatch(name) and not name.startswith(".") and name.strip() == name
    if not ok:
        raise ConfigError(
            field, f"{name!r} cannot be a folder name: use 1-200 characters without '/', '\\\\' or a leading '.'"
        )
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > NAME_BYTES:
        raise ConfigError(field, f"{name[:40]!r}... is {size} bytes in UTF-8; a folder name can take at most "
                          f"{NAME_BYTES} (file systems allow 255, and suffixes are added to it)")  # fmt: skip
    return name


def run_name_of(adapters: AdapterSpec | None, adapter_path: str | None = None) -> str:
    """The default run name: the adapters' legend, or, when evaluating saved adapters, their run folder's name."""
    if adapter_path:
        return Path(adapter_path).resolve().parent.name or "adapter"
    return adapters.legend()


#: Run folders this process created; a run that fails before using its folder gives it back (release_unused).
CLAIMED: list[Path] = []
#: Folders this process created for a command's output (``writable``), deepest first; a command that fails before
#: using them removes those left empty (release_unused).
CREATED: list[Path] = []
#: Lock files this process holds (open for the life of the process: the lock goes when the process does).
_HELD: dict[Path, int] = {}


def lock_folder(folder: Path) -> int | None:
    """Hold ``folder``'s lock for the rest of this process; ``None`` if another live process holds it (the pid it
    wrote is then in the lock file). Re-locking a folder this process holds returns its descriptor."""
    folder = Path(folder)
    if folder in _HELD:
        return _HELD[folder]
    fd = open_lock_file(folder / LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    try:  # who holds it, for messages: best effort (a full disk still lets the lock itself work)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    _HELD[folder] = fd
    return fd


def unlock_folder(folder: Path) -> None:
    fd = _HELD.pop(Path(folder), None)
    if fd is not None:
        os.close(fd)


def unlock_all() -> None:
    """Give back every run folder this process holds (its command is over)."""
    for folder in list(_HELD):
        unlock_folder(folder)


def holder(folder: Path) -> str:
    """Who holds ``folder``'s lock, for messages: ``pid N``."""
    try:
        pid = (Path(folder) / LOCK).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def in_use(folder: Path) -> bool:
    """Whether a live process other than this one holds ``folder``'s lock."""
    folder = Path(folder)
    if folder in _HELD or not (folder / LOCK).exists():
        return False
    import stat

    try:  # never through a link, never blocking (a FIFO put there)
        fd = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True  # a lock that cannot be read as one: treat the folder as taken, never as free
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def first_free(name: str, take, bare: bool = True) -> str:
    """The first of ``name`` (unless not ``bare``), ``name-1``, ``name-2``... that ``take(candidate)`` takes in one
    step (it raises ``FileExistsError`` for a name already taken): how runs, predictions and failed sweep runs are
    named."""
    i = 0 if bare else 1
    while True:
        candidate = name if i == 0 else f"{name}-{i}"
        try:
            take(candidate)
            return candidate
        except FileExistsError:
            i += 1


def claim(parent: Path, name: str) -> str:
    """Create ``parent/name`` (or ``name-1``, ``name-2``... if taken) in one step, lock it, and return the name taken,
    so two runs started together never share a folder."""
    writable(parent, "logs_dir")
    taken = first_free(name, lambda c: (parent / c).mkdir())
    CLAIMED.append(parent / taken)
    lock_folder(parent / taken)
    return taken


def claim_named(parent: Path, name: str, resuming: str | None) -> str:
    """The folder of a run named by ``--run_name``: a new one, or, when resuming (``--ckpt_path``), the existing one
    unless another process is using it now."""
    writable(parent, "logs_dir")
    folder = parent / name
    try:
        folder.mkdir()
        CLAIMED.append(folder)
    except FileExistsError:
        if not resuming:
            raise ConfigError(
                "run_name",
                f"{folder} exists (another run, or one running now): choose another --run_name, leave it out "
                "for a fresh name, or resume that run with --ckpt_path",
            ) from None
    if lock_folder(folder) is None:
        raise ConfigError(
            "run_name", f"{folder} is in use by a run still running ({holder(folder)}): wait for it, or stop it first"
        )
    return name


def writable(folder: Path, field: str) -> None:
    """Refuse, before any work, a folder this process cannot create or write into."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    CREATED.extend(p for p in missing if p not in CREATED)  # before mkdir: one made before a failure goes too
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            field, f"cannot write to {folder} ({e.strerror}): choose a --{field} you can write to"
        ) from None


def check_space(folder: Path, need: int, what: str) -> None:
    """Refuse to start when ``folder``'s disk has less than ``need`` bytes free (a disk already full would fail at the
    first file the run writes, after the data and the model were loaded)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise ConfigError(
            "logs_dir",
            f"only {free / 2**20:,.0f} MiB free on the disk of {folder}; {what} needs about {need / 2**20:,.0f} MiB: "
            "free some space or choose a --logs_dir on another disk",
        )


def keep_claimed() -> None:
    """Training has started: the run folders this process claimed are kept whatever happens next (a crash mid-run
    keeps its logs and config; only a run that failed on its input, before training, leaves nothing)."""
    CLAIMED.clear()


def release_unused() -> None:
    """Remove the run folders this process claimed and never used (no checkpoint, adapter or table in them): a run
    that failed on its input leaves nothing behind that would shift the next run's name. Then the folders it created
    on the way (``writable``: an experiment folder, an ``--out_dir``, their parents) that are left empty."""
    for folder in CLAIMED:
        if folder.is_dir() and not any((folder / n).exists() for n in ("checkpoints", "adapter", "validation.json")):
            unlock_folder(folder)
            shutil.rmtree(folder, ignore_errors=True)
    CLAIMED.clear()
    for folder in sorted(CREATED, key=lambda p: len(p.absolute().parts), reverse=True):  # the deepest first
        try:
            folder.rmdir()  # only an empty one: another run's folder, or a file, keeps it
        except OSError:
            pass
    CREATED.clear()


def output_dir(
    command: str, logs_dir: str, experiment: str, run: str, adapter_path=None, ckpt_path=None, out_dir=None
) -> Path:
    """Where tables and predictions go: ``out_dir`` when given, else the trained run's folder when it is known."""
    if command == "fit":
        return Path(logs_dir) / experiment / run
    if out_dir:
        return Path(out_dir)
    if adapter_path:
        return Path(adapter_path).resolve().parent
    if ckpt_path:
        return Path(ckpt_path).resolve().parent.parent
    return Path(logs_dir) / experiment / f"{run}-{command}"


def write_predictions(folder: Path, predictions: list[dict]) -> Path:
    """``predictions.jsonl`` in ``folder`` (``predictions-1.jsonl``... if taken: an earlier file is never
    overwritten, even by a second ``predict`` writing at the same moment): one ``{"prompt", "answer"}`` per line."""
    from fff_lightning.files import write_text

    folder.mkdir(parents=True, exist_ok=True)
    # O_EXCL: the name is ours from here, even against a second ``predict`` writing at the same moment
    name = first_free(
        "predictions", lambda c: os.close(os.open(folder / f"{c}.jsonl", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    )
    out = folder / f"{name}.jsonl"
    return write_text(out, "".join(json_line(p) + "\n" for p in predictions))


def json_line(obj) -> str:
    """One JSON object on one line, readable text kept, with the characters that other line splitters (Python's
    ``str.splitlines``, some editors) take for line ends escaped: U+0085, U+2028, U+2029."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


@dataclass
class RunFolder:
    """Where one command's files go, decided once, before any work: the run's name, its folder (claimed and locked
    for ``fit``), the folder its table or predictions go to, and its TensorBoard logger.

    Build it with :meth:`open`; :func:`release_unused` gives back a claimed folder that a failed run never used.
    """

    command: str
    logs_dir: str
    experiment: str
    name: str
    #: Where the run's checkpoints and adapters (``fit``) or its table or predictions (the others) go.
    path: Path

    @classmethod
    def open(cls, command: str, *, logs_dir: str, experiment: str, run_name: str | None, adapters: AdapterSpec,
             adapter_path: str | None = None, ckpt_path: str | None = None, out_dir: str | None = None,
             first_process: bool = True, shared_name: str | None = None) -> RunFolder:  # fmt: skip
        """Name the run and, for ``fit`` in the first process, claim its folder atomically (two runs never share
        one; a ``--run_name``'s existing folder only when resuming); the other processes of a several-process run
        pass ``shared_name``, the name the first one took. Other commands check, before the work, that their
        output folder can be written."""
        check_name("experiment", experiment)
        if run_name is not None:
            check_name("run_name", run_name)
        name = run_name or run_name_of(adapters, None if command == "fit" else adapter_path)
        if command == "fit":
            parent = Path(logs_dir) / experiment
            if not first_process:
                name = check_name("FFF_RUN_NAME", shared_name) if shared_name else name
            elif run_name is not None:
                name = claim_named(parent, name, ckpt_path)
            else:
                name = claim(parent, name)
        path = output_dir(command, logs_dir, experiment, name, adapter_path, ckpt_path, out_dir)
        if command != "fit":  # its results must have somewhere to go: known before the work
            writable(path, "out_dir")
        return cls(command, logs_dir, experiment, name, path)

    def logger(self, given=None):
        """The run's loggers as a LightningCLI config value: the TensorBoard logger writing into this run's folder
        and, after it, the loggers the command line or config gives (``given``: one, a list, or ``None``/``True``
        for none), so that they log beside the run folder and never move it. A TensorBoard logger into
        ``<logs_dir>/<experiment>/`` among them (a run's saved ``config.yaml``, given again) is a run folder's own:
        this run's takes its place."""
        from jsonargparse import Namespace

        ours = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(
                save_dir=self.logs_dir, name=self.experiment, version=self.name, default_hp_metric=False
            ),
        )
        if given is None or given is True:
            return ours
        theirs = [g for g in (given if isinstance(given, list) else [given]) if g not in (None, True, False)]
        theirs = [g for g in theirs if not self._run_folder_logger(g)]
        return [ours, *theirs] if theirs else ours

    def _run_folder_logger(self, logger) -> bool:
        """Whether ``logger`` (a config value) is a run folder's TensorBoard logger, as a run's saved config.yaml
        holds it: one into this experiment, or one written as :meth:`logger` writes it (a named version, no hp
        metric) wherever it points (a run of another experiment, logs dir or machine: never written into)."""
        class_path = str(getattr(logger, "class_path", "") or "")
        args = getattr(logger, "init_args", None)
        if class_path.rsplit(".", 1)[-1] != "TensorBoardLogger" or args is None:
            return False
        if isinstance(args.get("version"), str) and args.get("default_hp_metric") is False:
            return True
        save_dir, name = args.get("save_dir"), args.get("name")
        if not isinstance(save_dir, str | os.PathLike) or not isinstance(name, str):
            return False
        return (Path(save_dir) / name).resolve() == (Path(self.logs_dir) / self.experiment).resolve()
