"""What several test files read from a run: its logged losses, its adapter weights; and the environment for runs
started as subprocesses (which import ``faults`` from this folder)."""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # `faults` for the subprocesses
QUICK = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")
#: Keys an environment may differ in and still be the zygote's (pytest sets the first per test).
_IGNORED = ("PYTEST_CURRENT_TEST", "PYTHONPATH")


class _Zygote:
    """``tests/zygote.py``, one per test worker, started on first use."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "zygote.py")], env=ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        self.buf = b""
        self.exited: dict[int, int] = {}

    def _next(self, timeout: float) -> dict | None:
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                raise RuntimeError("the test zygote died")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, **req) -> int:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            msg = self._next(60)
            if msg is None:
                raise RuntimeError("the test zygote did not answer")
            if "pid" in msg:
                return msg["pid"]
            self.exited[msg["exited"]] = msg["code"]

    def wait(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.exited:
            left = 3600 if deadline is None else deadline - time.monotonic()
            msg = self._next(max(left, 0))
            if msg is None:
                return None
            self.exited[msg["exited"]] = msg["code"]
        return self.exited.pop(pid)


_zygote: _Zygote | None = None


def _same_env(env: dict) -> bool:
    """Whether ``env`` is the zygote's (what its libraries read on import), but for keys read at run time."""

    def strip(e):
        return {k: v for k, v in e.items() if k not in _IGNORED}

    return strip(env) == strip(ENV)


def start_zygote() -> None:
    """Start the zygote now (its imports then overlap the tests that come before the first command)."""
    global _zygote
    if sys.platform == "linux" and (_zygote is None or _zygote.proc.poll() is not None):
        _zygote = _Zygote()


class Forked:
    """``python -m fff_lightning <argv>`` started by the zygote, seen as a ``subprocess.Popen`` with text pipes."""

    def __init__(self, argv: list[str], cwd, env: dict):
        start_zygote()
        self.zygote = _zygote
        self.files = [tempfile.NamedTemporaryFile("w+", suffix=".txt") for _ in range(2)]
        self.pid = _zygote.start(argv=list(argv), cwd=str(cwd or os.getcwd()), env=env,
                                 out=self.files[0].name, err=self.files[1].name)  # fmt: skip
        self.returncode: int | None = None
        self.args = [sys.executable, "-m", "fff_lightning", *argv]

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.zygote.wait(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = code
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        out = []
        for f in self.files:
            with f:
                f.seek(0)
                out.append(f.read())
        return out[0], out[1]


def start_cli(argv: list[str], *, cwd=None, env: dict | None = None, **popen):
    """``python -m fff_lightning <argv>`` in a new process, its output through pipes: a fork of the test zygote
    (``tests/zygote.py``: the imports done, the same command otherwise) where the environment is the tests' own, a
    new Python where it is not (variables that libraries read on import) or on request (``fresh=True``)."""
    env = ENV if env is None else env
    fresh = popen.pop("fresh", False)
    if not fresh and sys.platform == "linux" and _same_env(env):
        return Forked(argv, cwd, env)
    cmd = [sys.executable, "-m", "fff_lightning", *argv]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(argv: list[str], *, cwd=None, env: dict | None = None, timeout: float = 600, fresh: bool = False):
    """Run ``python -m fff_lightning <argv>`` (see :func:`start_cli`) to its end, as ``subprocess.run`` with
    ``capture_output=True, text=True`` does."""
    proc = start_cli(argv, cwd=cwd, env=env, fresh=fresh)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def quick_args(logs, *extra, steps: int, command: str = "fit") -> list[str]:
    """The command line of a short tiny-model run into ``logs``: logging every step, no progress bar or model
    summary; ``extra`` options come last, so they override."""
    return [
        command,
        *("--config", QUICK, "--logs_dir", str(logs), "--trainer.max_steps", str(steps)),
        *("--trainer.log_every_n_steps", "1"),
        *("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"),
        *extra,
    ]


def losses(run: Path) -> dict[int, float]:
    """The run's ``train/loss`` per step, from its TensorBoard events."""
    return scalars(run, "train/loss")


def scalars(run: Path, tag: str) -> dict[int, float]:
    """One scalar series of a run, read as ``report`` reads it."""
    from fff_lightning.report import read_curves

    return dict(read_curves(Path(run)).get(tag, []))


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def refused(argv: list[str], capsys, codes=(1, 2), one_error: bool = False) -> str:
    """Run ``python -m fff_lightning <argv>`` in this process; assert it exits with one of ``codes`` and prints no
    traceback (with ``one_error``: exactly one ``error`` line); return the last line it printed on stderr."""
    import pytest

    from fff_lightning.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert e.value.code in codes, (e.value.code, err)
    assert err and "Traceback" not in "\n".join(err), err
    assert not one_error or sum(line.startswith("error") for line in err) == 1, err
    return err[-1]
