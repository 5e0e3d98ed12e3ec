"""``python -m fff_lightning sweep --config <grid.yaml>``: a grid of runs, each through the normal ``fit`` and
``validate``, one after another, with budget-matched LoRA baselines on request.

A grid file::

    sweep:
      experiment: step1_i                 # runs go to <logs_dir>/<experiment>/<run name>/
      configs: [step2.yaml]               # run configs every run starts from (paths next to this file)
      set:                                # settings every run shares (the dotted keys `fit` takes)
        model.lr: 3.0e-5
      grid:                               # every combination of these values is a run
        model.fff.width: [64, 128]
        model.fff.n_sublayers: [1, 6]
      baselines: lora_rank                # optional: for each FFF run, the LoRA-only run of the closest budget

Runs are named after their adapters (the research's legend, ``lora-[128]-6-[gelu_new]-[up_proj]``), plus the
grid's other settings (``-lr=3e-05``). A run that finished (its ``validation.json`` exists and ``sweep.json`` records
it with the same settings) is skipped when the sweep runs again; a run that fails is recorded with its error,
its folder is kept aside as ``<name>.failed-<n>`` when the sweep next runs it, and the sweep goes on.

One sweep of an experiment runs at a time (a second copy is refused: ``<logs_dir>/<experiment>/.sweep.lock``); a
run folder another process is using is never renamed; each run's process dies with the sweep, even after a
``kill -9`` of the sweep (Linux), and Ctrl-C or SIGTERM to the sweep reaches the run, which saves its checkpoint.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fff_lightning import config_files
from fff_lightning.errors import ConfigError

ADAPTER_KEYS = ("model.fff", "model.lora")
#: Grid keys the run's legend already shows (``lora-[128]-6-[gelu_new]-[up_proj]``); others go into a suffix.
IN_LEGEND = ("model.fff.width", "model.fff.n_sublayers", "model.fff.activation", "model.fff.targets")
BASELINES = ("lora_rank",)


@dataclass
class Grid:
    """A sweep, read from its YAML file."""

    experiment: str
    configs: list[str]
    grid: dict[str, list]
    set: dict = field(default_factory=dict)
    baselines: str | None = None
    logs_dir: str = "logs"
    validate: bool = True


@dataclass
class Run:
    name: str
    overrides: list[str]
    baseline_of: str | None = None
    trainable: int | None = None  # counted on the meta device; None when the run's adapters do not fit the model
    #: why the run cannot train, known before it starts (its adapters do not fit the model): recorded as failed
    #: without starting a process
    error: str | None = None


def load_grid(path: str | Path) -> Grid:
    import yaml

    path = config_files.path(path)  # a file, or a shipped grid by name (step1_i)
    if not path.is_file():
        raise ConfigError("sweep", f"no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("sweep", f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    spec = data.get("sweep") if isinstance(data, dict) else None
    if not isinstance(spec, dict):
        raise ConfigError("sweep", f"{path} has no top-level 'sweep:' mapping")
    allowed = set(Grid.__dataclass_fields__)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]}", f"unknown field; allowed: {', '.join(Grid.__dataclass_fields__)}")
    for key in ("experiment", "configs", "grid"):
        if key not in spec:
            raise ConfigError(f"sweep.{key}", "is required")
    grid = Grid(**spec)
    if not isinstance(grid.grid, dict) or not grid.grid:
        raise ConfigError("sweep.grid", "give at least one setting with a list of values")
    for key, values in grid.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}", f"must be a non-empty list of values; got {values!r}")
    if grid.baselines is not None and grid.baselines not in BASELINES:
        raise ConfigError("sweep.baselines", f"unknown value {grid.baselines!r}; allowed: {', '.join(BASELINES)}")
    # Config paths are relative to the grid file, as `fit`'s budget targets are to theirs.
    grid.configs = [str(c if Path(c).is_absolute() else (path.parent / c)) for c in grid.configs]
    for c in grid.configs:
        if not Path(c).is_file():
            raise ConfigError("sweep.configs", f"no such run config: {c}")
    return grid


def _flag(key: str, value) -> str:
    return f"--{key}={json.dumps(value) if not isinstance(value, str) else value}"


def _suffix(settings: dict) -> str:
    """The grid's settings that the legend does not show, short: ``-layers=13-19-lr=3e-05``."""
    parts = []
    for key, value in settings.items():
        if key in IN_LEGEND:
            continue
        short = key.rsplit(".", 1)[-1]
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{short}={text}".replace("/", "_").replace(" ", ""))
    return "".join(f"-{p}" for p in parts)


def expand(grid: Grid) -> list[Run]:
    """Every run of the grid, with its name and ``fit`` overrides, then the baselines asked for."""
    from fff_lightning.adapters import count_adapters
    from fff_lightning.run_config import describe_run

    shared = [_flag(k, v) for k, v in grid.set.items()]
    keys = list(grid.grid)
    runs: list[Run] = []
    for values in itertools.product(*(grid.grid[k] for k in keys)):
        settings = dict(zip(keys, values, strict=True))
        overrides = shared + [_flag(k, v) for k, v in settings.items()]
        module = describe_run(*grid.configs, overrides=overrides).model
        name = module.adapters.legend() + _suffix(settings)
        trainable = error = None
        try:
            trainable = count_adapters(module.adapters, module.base_shape()).trainable
        except ConfigError as e:  # e.g. a layer the model does not have: recorded as failed, not started
            error = f"error: {e}"
        runs.append(Run(name, overrides, trainable=trainable, error=error))
        if grid.baselines == "lora_rank" and module.adapters.fff is not None:
            runs.append(_baseline(module, settings, shared, name, trainable))
    unique: dict[str, Run] = {}
    for r in runs:
        if r.name in unique and not (r.baseline_of or unique[r.name].baseline_of):
            raise ConfigError("sweep.grid", f"two runs would share the name {r.name!r}: their adapters are the same")
        unique.setdefault(r.name, r)  # a baseline that several FFF runs share is run once
    return list(unique.values())


def _baseline(module, settings: dict, shared: list[str], of: str, target: int | None) -> Run:
    """The LoRA-only run (the run's LoRA modules and layers, or all seven of every layer) closest in budget."""
    from fff_lightning.budget import match_lora_rank

    if target is None:  # the run itself is bad; it will fail and be recorded
        return Run(
            f"{of}-baseline", [], baseline_of=of, error=f"no budget to match: {of}'s adapters do not fit the model"
        )
    match = match_lora_rank(module.base_shape(), target, module.adapters.lora)
    r = match.value
    lora = {"r": r, **({} if module.adapters.lora is None else {"alpha": None, "preset": None})}
    other = {k: v for k, v in settings.items() if not k.startswith(ADAPTER_KEYS)}
    overrides = [*shared, *(_flag(k, v) for k, v in other.items()), "--model.fff=null", _flag("model.lora", lora)]
    return Run(f"lora-r{r}{_suffix(other)}", overrides, baseline_of=of, trainable=match.budget.trainable)


# -- running -----------------------------------------------------------------------------------------------------
def _status_path(grid: Grid) -> Path:
    return Path(grid.logs_dir) / grid.experiment / "sweep.json"


def _read_status(grid: Grid) -> dict:
    path = _status_path(grid)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return {}


def _write_status(grid: Grid, status: dict) -> None:
    from fff_lightning.files import write_text

    write_text(_status_path(grid), json.dumps(status, indent=2) + "\n")


def lock_experiment(grid: Grid) -> int:
    """Hold the experiment's sweep lock for the rest of this process; refuse a second sweep of it in one line."""
    from fff_lightning.runs import writable

    folder = Path(grid.logs_dir) / grid.experiment
    writable(folder, "logs_dir")
    fd = os.open(folder / ".sweep.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f"pid {other}" if other.isdigit() else "its lock is held"
        raise ConfigError(
            "sweep",
            f"another sweep of {grid.experiment!r} is running ({who}; {folder / '.sweep.lock'}): wait for it, or "
            "stop it first",
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _finished(grid: Grid, run: Run, status: dict) -> bool:
    entry = status.get(run.name, {})
    table = Path(grid.logs_dir) / grid.experiment / run.name / "validation.json"
    return entry.get("state") == "done" and entry.get("overrides") == run.overrides and table.is_file()


def _command(grid: Grid, run: Run, subcommand: str) -> list[str]:
    cmd = [sys.executable, "-m", "fff_lightning", subcommand]
    cmd += [a for c in grid.configs for a in ("--config", c)] + run.overrides
    cmd += [f"--experiment={grid.experiment}", f"--logs_dir={grid.logs_dir}", f"--run_name={run.name}"]
    if subcommand == "validate":
        cmd.append(f"--model.adapter_path={Path(grid.logs_dir) / grid.experiment / run.name / 'adapter'}")
    return cmd


def _set_aside(folder: Path) -> str | None:
    """Keep an unfinished run's folder, renamed, so the rerun starts clean and nothing is lost; a folder a live
    process is using (a ``fit`` started by hand under the same name) is left alone: returns why not."""
    from fff_lightning.runs import first_free, holder, in_use

    if not folder.exists():
        return None
    if in_use(folder):
        return f"{folder} is in use by a run still running ({holder(folder)}); not touched"
    # first_free takes a name by creating it empty (no two sweeps take the same one); the rename replaces it
    kept = first_free(f"{folder.name}.failed", lambda c: folder.with_name(c).mkdir(), bare=False)
    folder.rename(folder.with_name(kept))
    return None


def _die_with_parent() -> None:
    """In a run's process, before it starts: the kernel sends it SIGTERM when the sweep dies, even of ``kill -9``
    (Linux ``PR_SET_PDEATHSIG``); the run then saves its checkpoint and stops, and a rerun cannot collide with it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the run outlives a killed sweep
        pass


def _run_child(cmd: list[str], quiet: bool) -> subprocess.CompletedProcess:
    """One ``fit``/``validate`` of the sweep. Ctrl-C or SIGTERM to the sweep reach the run (it saves and stops)
    and the sweep waits for it, then stops too."""
    kw = dict(stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE if quiet else None, text=True)
    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent, **kw)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        out, err = proc.communicate()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        from fff_lightning.errors import Interrupted

        tail = (err or "").strip().splitlines()[-1:] if quiet else []
        raise Interrupted(
            f"sweep interrupted by {signal.Signals(got[0]).name} during {cmd[3]} of a run"
            + (f": {tail[0]}" if tail else "; the run's own line above says what it saved"),
            got[0],
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["exit code without a message"])[-1][:300]


def run_grid(grid: Grid, runs: list[Run], quiet: bool = False) -> dict:
    """Run what is not finished yet, one run after another; returns the status of every run."""
    status = _read_status(grid)
    todo = [r for r in runs if not _finished(grid, r, status)]
    skipped = len(runs) - len(todo)
    print(f"[sweep] {grid.experiment}: {len(runs)} runs, {skipped} already finished, {len(todo)} to run", flush=True)
    durations: list[float] = []
    started = time.perf_counter()
    for i, run in enumerate(todo, start=1):
        folder = Path(grid.logs_dir) / grid.experiment / run.name
        left = f", about {_fmt(statistics.mean(durations) * (len(todo) - i + 1))} left" if durations else ""
        print(f"[sweep] run {i} of {len(todo)}: {run.name}{left}", flush=True)
        t0 = time.perf_counter()
        entry = {"overrides": run.overrides, "baseline_of": run.baseline_of}
        if run.error:  # known before it starts: the run's adapters do not fit the model
            entry.update(state="failed", step="check", error=run.error)
        elif busy := _set_aside(folder):
            entry.update(state="failed", step="fit", error=busy)
        else:
            steps = ["fit", "validate"] if grid.validate else ["fit"]
            for sub in steps:
                done = _run_child(_command(grid, run, sub), quiet)
                if done.returncode != 0:
                    entry.update(state="failed", step=sub, error=_error_line(done.stderr or ""))
                    break
            else:
                entry["state"] = "done"
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        durations.append(entry["seconds"])
        status[run.name] = entry
        _write_status(grid, status)
        shown = "done" if entry["state"] == "done" else f"FAILED ({entry.get('error')})"
        print(f"[sweep] {run.name}: {shown} in {_fmt(entry['seconds'])}", flush=True)
    failed = [n for n, e in status.items() if e.get("state") == "failed" and n in {r.name for r in runs}]
    print(
        f"[sweep] finished in {_fmt(time.perf_counter() - started)}: {len(runs) - len(failed)} of {len(runs)} runs "
        f"done{'; failed: ' + ', '.join(failed) if failed else ''}. Status: {_status_path(grid)}",
        flush=True,
    )
    return status


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m fff_lightning sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", "-c", required=True, help="the grid file")
    p.add_argument("--logs_dir", help="root folder of the runs (default: the grid's, else logs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--quiet", action="store_true", help="keep the runs' own output off the terminal")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    if args.logs_dir:
        grid.logs_dir = args.logs_dir
    if not args.dry_run:
        lock_experiment(grid)  # before the grid is expanded: a second copy is refused at once
    runs = expand(grid)
    if args.dry_run:
        for r in runs:
            budget = f"{r.trainable:,} trainable" if r.error is None else f"will not run: {r.error}"
            print(f"{r.name}   {budget}{f'   (baseline of {r.baseline_of})' if r.baseline_of else ''}")
        return
    status = run_grid(grid, runs, quiet=args.quiet)
    if any(status.get(r.name, {}).get("state") != "done" for r in runs):
        sys.exit(1)
