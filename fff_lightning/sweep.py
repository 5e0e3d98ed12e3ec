"""``python -m fff_lightning sweep --config <grid.yaml>``: a grid of runs, each through the normal ``fit`` and
``validate``, one after another, with budget-matched LoRA baselines on request.

A grid file::

    sweep:
      experiment: step1_i                 # runs go to <logs_dir>/<experiment>/<run name>/
      configs: [step2.yaml]               # run configs every run starts from (paths next to this file; with arms
                                          #   that each give their configs, leave it out)
      set:                                # settings every run shares (the dotted keys `fit` takes)
        model.lr: 3.0e-5
      grid:                               # every combination of these values is a run
        model.fff.width: [64, 128]
        model.fff.n_sublayers: [1, 6]
      baselines: lora_rank                # optional: for each FFF run, the LoRA-only run of the closest budget
      seeds: [12, 13, 14]                 # optional: every run once per seed (model.seed: the adapters' draws)
      seed_data: false                    # optional: the seed also moves the data order (data.seed)
      arms:                               # optional: named sides of a comparison, each crossed with the grid
        fff: {configs: [step2.yaml]}      #   and the seeds; each may give its own configs, set and seeds
        lora: {configs: [step2_lora.yaml]}

With seeds, a run's name ends in ``-seed=<n>`` (its folder too) and ``report`` groups runs by everything else;
with arms, names start with the arm's name. A baseline gets the seed of the run it matches.

Runs are named after their adapters (the research's legend, ``lora-[128]-6-[gelu_new]-[up_proj]``), plus the
grid's other settings (``-lr=3e-05``). A run that finished (its ``validation.json`` exists and ``sweep.json`` records
it with the same settings) is skipped when the sweep runs again; a run that fails is recorded with its error,
its folder is kept aside as ``<name>.failed-<n>`` when the sweep next runs it, and the sweep goes on.

One sweep of an experiment runs at a time (a second copy is refused: ``<logs_dir>/<experiment>/.sweep.lock``); a
run folder another process is using is never renamed; each run's process dies with the sweep, even after a
``kill -9`` of the sweep (Linux), and Ctrl-C or SIGTERM to the sweep reaches the run, which saves its checkpoint.

Each run is the same ``fit`` a user would type, in its own process. Beside an NVIDIA GPU that is a new Python; on a
machine without one it is a fork of the sweep, whose imports (torch, Lightning, transformers: about 8 s on a 2-core
CPU) are done once, so a small run takes a third of the time (``--fresh-processes``: new Pythons there too).
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


def adapter_keys() -> tuple[str, ...]:
    """``model.<kind>`` of every adapter kind (a grid key under one of them changes the run's adapters)."""
    from fff_lightning import kinds

    return tuple(f"model.{k}" for k in kinds.names())


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
    seeds: list[int] | None = None
    seed_data: bool = False
    arms: dict[str, dict] | None = None
    #: ``evaluate``'s options for every finished run (``tasks``, ``limit``, ``num_fewshot``, ``batch_size``,
    #: ``chat``, ``max_gen_toks``, ``seed``); ``None``: no evaluation
    evaluate: dict | None = None


#: What a grid's ``evaluate:`` may set: ``evaluate``'s own options.
EVALUATE_KEYS = {"tasks": (list, str), "limit": (int, float), "num_fewshot": int, "batch_size": int, "chat": bool,
                 "max_gen_toks": int, "seed": int}  # fmt: skip


@dataclass
class Run:
    name: str
    overrides: list[str]
    baseline_of: str | None = None
    trainable: int | None = None  # counted on the meta device; None when the run's adapters do not fit the model
    #: why the run cannot train, known before it starts (its adapters do not fit the model): recorded as failed
    #: without starting a process
    error: str | None = None
    configs: list[str] | None = None  # the arm's run configs (default: the grid's)
    seed: int | None = None
    group: str | None = None  # the name without the seed: the runs report takes together
    arm: str | None = None


def load_grid(path: str | Path) -> Grid:
    import yaml

    path = config_files.path(path)  # a file, or a shipped grid by name (step1_i)
    if not path.is_file():
        raise ConfigError("sweep", f"no such file: {path}")
    config_files.check_yaml_file(path)  # size, syntax (file:line:col) and alias expansion, before it is read
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
    if "experiment" not in spec:
        raise ConfigError("sweep.experiment", "is required")
    from fff_lightning.runs import check_name

    check_name("sweep.experiment", spec["experiment"])  # one folder under logs_dir: no ../, no a/b
    arms = spec.get("arms")
    if "configs" not in spec and not (
        isinstance(arms, dict) and arms and all(isinstance(a, dict) and a.get("configs") for a in arms.values())
    ):
        raise ConfigError("sweep.configs", "is required (unless every arm gives its own configs)")
    spec.setdefault("configs", [])
    spec.setdefault("grid", {})
    if not isinstance(spec["configs"], list):
        raise ConfigError("sweep.configs", f"must be a list of run configs; got {spec['configs']!r}")
    grid = Grid(**spec)
    grid.seeds = _seeds(grid.seeds, "sweep.seeds")
    if not isinstance(grid.seed_data, bool):
        raise ConfigError("sweep.seed_data", f"must be true or false; got {grid.seed_data!r}")
    if grid.arms is not None:
        if not isinstance(grid.arms, dict) or not grid.arms:
            raise ConfigError("sweep.arms", "must map arm names to {configs, set, seeds}")
        for name, arm in grid.arms.items():
            arm = {} if arm is None else arm
            if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError("sweep.arms", f"arm names are letters, digits, - and _; got {name!r}")
            if not isinstance(arm, dict) or set(arm) - {"configs", "set", "seeds"}:
                raise ConfigError(f"sweep.arms.{name}", "may give configs (a list), set (a mapping) and seeds")
            configs = arm.get("configs")
            if configs is not None and (not isinstance(configs, list) or not configs):
                raise ConfigError(f"sweep.arms.{name}.configs", "must be a non-empty list of run configs")
            if not isinstance(arm.get("set", {}), dict):
                raise ConfigError(f"sweep.arms.{name}.set", "must be a mapping of dotted keys to values")
            arm["seeds"] = _seeds(arm.get("seeds"), f"sweep.arms.{name}.seeds")
            arm["configs"] = [_config(c, path, f"sweep.arms.{name}.configs") for c in configs] if configs else None
            grid.arms[name] = arm
    if not isinstance(grid.grid, dict) or not (grid.grid or grid.seeds or grid.arms):
        raise ConfigError("sweep.grid", "give at least one setting with a list of values (or seeds, or arms)")
    for key, values in grid.grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.grid.{key}", f"must be a non-empty list of values; got {values!r}")
    if grid.baselines is not None and grid.baselines not in BASELINES:
        raise ConfigError("sweep.baselines", f"unknown value {grid.baselines!r}; allowed: {', '.join(BASELINES)}")
    _check_seed_keys(grid)
    grid.evaluate = _evaluate_spec(grid.evaluate)
    # Config paths are relative to the grid file, as `fit`'s budget targets are to theirs.
    grid.configs = [_config(c, path, "sweep.configs") for c in grid.configs]
    return grid


def _evaluate_spec(spec) -> dict | None:
    """A grid's ``evaluate:`` checked: a mapping of ``evaluate``'s options, ``tasks`` required (its task names are
    checked when the first evaluation starts)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or "tasks" not in spec:
        raise ConfigError(
            "sweep.evaluate", "must map evaluate's options, tasks required: {tasks: [fff_math], limit: 50}"
        )
    for key, value in spec.items():
        kind = EVALUATE_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"sweep.evaluate.{key}", f"unknown option; allowed: {', '.join(EVALUATE_KEYS)}")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"sweep.evaluate.{key}", f"wrong type: {value!r}")
    tasks = spec["tasks"] if isinstance(spec["tasks"], list) else str(spec["tasks"]).split(",")
    tasks = [str(t).strip() for t in tasks if str(t).strip()]
    if not tasks or len(set(tasks)) != len(tasks):
        what = "a task is named twice" if tasks else "give one or more task names, e.g. [fff_math, fff_math_bpb]"
        raise ConfigError("sweep.evaluate.tasks", f"{what}; got {spec['tasks']!r}")
    from fff_lightning import evaluate

    try:  # before anything trains: the values evaluate takes, lm-eval installed, the tasks known (offline: cached)
        evaluate.check_options(spec.get("limit"), spec.get("batch_size", 8), spec.get("num_fewshot"))
    except ConfigError as e:
        raise ConfigError(f"sweep.evaluate.{e.field.lstrip('-')}", e.message) from None
    try:
        evaluate.check_installed()
        evaluate.check_tasks(tasks, evaluate.local_tasks())
    except ConfigError as e:
        raise ConfigError("sweep.evaluate.tasks", e.message) from None
    return {**spec, "tasks": tasks}


def _check_seed_keys(grid: Grid) -> None:
    """With ``seeds``, the seed options are the sweep's: a ``model.seed`` (or, with ``seed_data``, a ``data.seed``)
    set by hand as well would be overridden, training the same run twice under two names."""
    seeded = grid.seeds or any(a.get("seeds") for a in (grid.arms or {}).values())
    if not seeded:
        return
    keys = {"model.seed"} | ({"data.seed"} if grid.seed_data else set())
    places = {"sweep.grid": grid.grid, "sweep.set": grid.set}
    places |= {f"sweep.arms.{n}.set": a.get("set") or {} for n, a in (grid.arms or {}).items()}
    for where, settings in places.items():
        clash = sorted(keys & set(settings))
        if clash:
            raise ConfigError(f"{where}.{clash[0]}", "is set by `seeds:` in this grid: give the seeds there only")


def _config(config: str, grid_file: Path, field: str) -> str:
    """A run config named in a grid, as an absolute path (so a rerun from another folder is the same run): a path
    relative to the grid file, else a shipped config's name."""
    local = Path(config) if Path(config).is_absolute() else grid_file.parent / config
    found = local if local.is_file() else config_files.shipped(config)
    if found is None:
        raise ConfigError(field, f"no such run config: {local}")
    return str(Path(found).resolve())


def _seeds(seeds, field: str) -> list[int] | None:
    if seeds is None:
        return None
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(field, f"must be a list of different ints >= 0, e.g. [12, 13, 14]; got {seeds!r}")
    return seeds


def _seeded(seed: int | None, data: bool) -> list[str]:
    """The overrides of one seed: the adapters' initial draws, and with ``seed_data`` the data order."""
    if seed is None:
        return []
    return [f"--model.seed={seed}"] + ([f"--data.seed={seed}"] if data else [])


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
    """Every run of the grid (per arm, per seed), with its name and ``fit`` overrides, then the baselines asked
    for."""
    from fff_lightning.run_config import describe_run

    shared = [_flag(k, v) for k, v in grid.set.items()]
    keys = list(grid.grid)
    runs: list[Run] = []
    for arm_name, arm in (grid.arms or {None: {}}).items():
        configs = arm.get("configs") or grid.configs
        arm_set = [_flag(k, v) for k, v in (arm.get("set") or {}).items()]
        prefix = f"{arm_name}-" if arm_name else ""
        for values in itertools.product(*(grid.grid[k] for k in keys)):
            settings = dict(zip(keys, values, strict=True))
            for seed in arm.get("seeds") or grid.seeds or [None]:
                seeded = _seeded(seed, grid.seed_data)
                overrides = shared + arm_set + [_flag(k, v) for k, v in settings.items()] + seeded
                module = describe_run(*configs, overrides=overrides).model
                group = prefix + module.adapters.legend() + _suffix(settings)
                name = group + (f"-seed={seed}" if seed is not None else "")
                trainable = error = None
                try:
                    trainable = module.plan.budget.trainable  # the run resolved and checked as fit will
                except ConfigError as e:  # e.g. a layer the model does not have: recorded as failed, not started
                    error = f"error: {e}"
                runs.append(Run(name, overrides, trainable=trainable, error=error, configs=configs, seed=seed,
                                group=group, arm=arm_name))  # fmt: skip
                if grid.baselines == "lora_rank" and module.adapters.fff is not None:
                    runs.append(
                        _baseline(module, settings, shared + arm_set, name, trainable, seeded, seed, configs, prefix)
                    )
    from fff_lightning.runs import check_name

    unique: dict[str, Run] = {}
    for r in runs:
        check_name("sweep (a run name made of its arm and grid values)", r.name)  # one folder under the experiment
        if r.name in unique and not (r.baseline_of or unique[r.name].baseline_of):
            raise ConfigError("sweep.grid", f"two runs would share the name {r.name!r}: their adapters are the same")
        unique.setdefault(r.name, r)  # a baseline that several FFF runs share is run once
    return list(unique.values())


def _baseline(module, settings: dict, shared: list[str], of: str, target: int | None, seeded: list[str],
              seed: int | None, configs: list[str], prefix: str = "") -> Run:  # fmt: skip
    """The LoRA-only run (the run's LoRA modules and layers, or all seven of every layer) closest in budget."""
    from fff_lightning.budget import match_lora_rank

    if target is None:  # the run itself is bad; it will fail and be recorded
        return Run(
            f"{of}-baseline", [], baseline_of=of, error=f"no budget to match: {of}'s adapters do not fit the model"
        )
    match = match_lora_rank(module.base_shape(), target, module.adapters.lora)
    r = match.value
    lora = {"r": r, **({} if module.adapters.lora is None else {"alpha": None, "preset": None})}
    other = {k: v for k, v in settings.items() if not k.startswith(adapter_keys())}
    # LoRA alone: FFF off (as sweeps always wrote it, so recorded baselines stay finished) and any other kind it has
    others_off = ["--model.fff=null"] + [
        f"--model.{k}=null" for k in module.adapters.configs if k not in ("fff", "lora")
    ]
    overrides = [*shared, *(_flag(k, v) for k, v in other.items()), *others_off, _flag("model.lora", lora),
                 *seeded]  # fmt: skip
    group = f"{prefix}lora-r{r}{_suffix(other)}"  # an arm's baseline is that arm's
    name = group + (f"-seed={seed}" if seed is not None else "")
    return Run(name, overrides, baseline_of=of, trainable=match.budget.trainable, configs=configs, seed=seed,
               group=group)  # fmt: skip


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


#: The sweep locks this process holds (a forked run closes its copies: the lock stays the sweep's alone).
_LOCKS: list[int] = []


def lock_experiment(grid: Grid) -> int:
    """Hold the experiment's sweep lock for the rest of this process; refuse a second sweep of it in one line."""
    from fff_lightning.files import open_lock_file
    from fff_lightning.runs import writable

    folder = Path(grid.logs_dir) / grid.experiment
    writable(folder, "logs_dir")
    fd = open_lock_file(folder / ".sweep.lock", "sweep")
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
    _LOCKS.append(fd)
    return fd


def _trained(grid: Grid, run: Run, status: dict) -> bool:
    """Whether the run trained (and validated) with its current settings: its table is there."""
    entry = status.get(run.name, {})
    table = Path(grid.logs_dir) / grid.experiment / run.name / "validation.json"
    same = entry.get("overrides") == run.overrides and entry.get("configs", run.configs or grid.configs) == (
        run.configs or grid.configs
    )
    return (entry.get("state") == "done" or entry.get("trained") is True) and same and table.is_file()


def _evaluated(grid: Grid, run: Run, status: dict) -> bool:
    """Whether the run has the grid's evaluation, with the grid's current options."""
    if grid.evaluate is None:
        return True
    folder = Path(grid.logs_dir) / grid.experiment / run.name / "eval"
    entry = status.get(run.name, {})
    return entry.get("evaluate") == grid.evaluate and all(
        (folder / f"{t}.json").is_file() for t in grid.evaluate["tasks"]
    )


def _finished(grid: Grid, run: Run, status: dict) -> bool:
    return _trained(grid, run, status) and _evaluated(grid, run, status)


def _command(grid: Grid, run: Run, subcommand: str) -> list[str]:
    cmd = [sys.executable, "-m", "fff_lightning", subcommand]
    cmd += [a for c in (run.configs or grid.configs) for a in ("--config", c)] + run.overrides
    cmd += [f"--experiment={grid.experiment}", f"--logs_dir={grid.logs_dir}", f"--run_name={run.name}"]
    folder = Path(grid.logs_dir) / grid.experiment / run.name
    if subcommand == "evaluate":  # the run as it was saved: its own config.yaml and adapters
        cmd = [sys.executable, "-m", "fff_lightning", "evaluate", "--config", str(folder / "config.yaml")]
        cmd.append(f"--model.adapter_path={folder / 'adapter'}")
        for key, value in (grid.evaluate or {}).items():
            if key == "tasks":
                value = ",".join(value)
            if key == "chat":
                cmd.append("--chat" if value else "--no-chat")
            else:
                cmd += [f"--{key}", str(value)]
        return cmd
    if subcommand == "validate":
        cmd.append(f"--model.adapter_path={folder / 'adapter'}")
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


def can_fork() -> bool:
    """Whether a run may start as a fork of the sweep (:func:`_start_forked`): on Linux, where no NVIDIA device
    exists. Beside one, every run starts as a new process: a CUDA driver initialised before a fork (Unsloth's import
    does) is unusable in the child, and a GPU run's minutes dwarf a Python start."""
    return sys.platform == "linux" and hasattr(os, "fork") and not os.path.exists("/dev/nvidiactl")


def _preload(evaluate: bool = False) -> None:
    """Import what every run imports (torch, Lightning, transformers, PEFT: about 8 s on a small CPU), once, in the
    sweep's process, so that a forked run starts with them done (``evaluate``: and lm-eval). Nothing is run: no
    thread pool, no device."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import fff_lightning.lightning_cli  # noqa: F401
    import fff_lightning.loading  # noqa: F401

    if evaluate:
        try:
            import lm_eval.evaluator  # noqa: F401
            import lm_eval.models.huggingface  # noqa: F401
        except ImportError:  # the evaluation says what to install
            pass


def _start_forked(argv: list[str], out, err) -> int:
    """Start ``python -m fff_lightning <argv>`` as a fork of this process: the same command, its imports done.
    The child answers signals as a fresh Python does, closes the sweep's locks, writes to ``out``/``err`` (files;
    ``None``: the terminal), and leaves through ``os._exit`` with the exit code ``python -m`` would give."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in _LOCKS:
            os.close(fd)
        for f, fd in ((out, 1), (err, 2)):
            if f is not None:
                os.dup2(f.fileno(), fd)
        import runpy

        sys.argv[1:] = argv
        runpy.run_module("fff_lightning", run_name="__main__", alter_sys=True)  # as `python -m fff_lightning` runs
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class _Forked:
    """A run started by :func:`_start_forked`, seen as ``subprocess.Popen`` is: ``poll``, ``send_signal``,
    ``communicate``, ``returncode`` (its output, with ``quiet``, through temporary files rather than pipes)."""

    def __init__(self, argv: list[str], quiet: bool):
        import tempfile

        self.files = [tempfile.TemporaryFile("w+") for _ in range(2)] if quiet else [None, None]
        self.pid = _start_forked(argv, *self.files)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode  # reaped by communicate alone: until then the pid is the run's, even exited

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def communicate(self) -> tuple[str | None, str | None]:
        self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return tuple(self._read(f) for f in self.files)

    @staticmethod
    def _read(f) -> str | None:
        if f is None:
            return None
        with f:
            f.seek(0)
            return f.read()


def _run_child(cmd: list[str], quiet: bool, fork: bool = False) -> subprocess.CompletedProcess:
    """One ``fit``/``validate`` of the sweep, a new process (``fork``: a fork of this one, :func:`_start_forked`).
    Ctrl-C or SIGTERM to the sweep reach the run (it saves and stops) and the sweep waits for it, then stops too."""
    if fork:
        proc = _Forked(cmd[3:], quiet)
    else:
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


def run_grid(grid: Grid, runs: list[Run], quiet: bool = False, fork: bool = False) -> dict:
    """Run what is not finished yet, one run after another; returns the status of every run. ``fork``: each run
    starts as a fork of this process, whose imports are done once (:func:`can_fork` says where that is safe)."""
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
        entry = {"overrides": run.overrides, "baseline_of": run.baseline_of, "configs": run.configs or grid.configs}
        entry |= {"seed": run.seed, "group": run.group or run.name, "arm": run.arm, "trainable": run.trainable}
        trained = _trained(grid, run, status)  # and not evaluated yet: only the evaluation runs
        if run.error:  # known before it starts: the run's adapters do not fit the model
            entry.update(state="failed", step="check", error=run.error)
        elif not trained and (busy := _set_aside(folder)):
            entry.update(state="failed", step="fit", error=busy)
        else:
            steps = [] if trained else ["fit", "validate"] if grid.validate else ["fit"]
            steps += ["evaluate"] if grid.evaluate is not None else []
            if fork:
                _preload(evaluate=grid.evaluate is not None)  # once: the imports are cached after the first run
            entry["trained"] = trained
            last = "validate" if grid.validate else "fit"
            for sub in steps:
                if sub == "evaluate":  # trained and validated: recorded now, so an interrupted evaluation never
                    status[run.name] = {**entry, "state": "trained"}  # has the run trained again
                    _write_status(grid, status)
                done = _run_child(_command(grid, run, sub), quiet, fork)
                if done.returncode != 0:
                    entry.update(state="failed", step=sub, error=_error_line(done.stderr or ""))
                    break
                entry["trained"] = entry["trained"] or sub == last
            else:
                entry["state"] = "done"
                if grid.evaluate is not None:
                    entry["evaluate"] = grid.evaluate
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
    p = argparse.ArgumentParser(prog="python -m fff_lightning sweep", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", "-c", required=True, help="the grid file")
    p.add_argument("--logs_dir", help="root folder of the runs (default: the grid's, else logs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--quiet", action="store_true", help="keep the runs' own output off the terminal")
    fresh = ("start each run as a new Python process (always so beside an NVIDIA GPU; elsewhere each run is a fork "
             "of the sweep, its imports done once: about 8 s less a run on a small CPU)")  # fmt: skip
    p.add_argument("--fresh-processes", action="store_true", help=fresh)
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    if args.logs_dir:
        grid.logs_dir = args.logs_dir
    if not args.dry_run:
        lock_experiment(grid)  # before the grid is expanded: a second copy is refused at once
    runs = expand(grid)
    if args.dry_run:
        status = _read_status(grid)
        for r in runs:
            budget = f"{r.trainable:,} trainable" if r.error is None else f"will not run: {r.error}"
            done = "   (finished: skipped)" if _finished(grid, r, status) else ""
            done = done or ("   (trained: evaluated only)" if _trained(grid, r, status) else "")
            print(f"{r.name}   {budget}{f'   (baseline of {r.baseline_of})' if r.baseline_of else ''}{done}")
        return
    status = run_grid(grid, runs, quiet=args.quiet, fork=can_fork() and not args.fresh_processes)
    if any(status.get(r.name, {}).get("state") != "done" for r in runs):
        sys.exit(1)
