"""Several processes (DDP): which process this is before Lightning knows, and which strategies a 4-bit run supports.

Each process holds its own copy of the (4-bit) base model on its own device and the adapters' gradients are
averaged (DDP); :class:`~fff_lightning.data.FFFDataModule` gives each process its own share of the data. Sharding
the base model itself (FSDP, DeepSpeed) is not supported: bitsandbytes' 4-bit weights are not shardable that way.
"""

from __future__ import annotations

import os

import torch

from fff_lightning.errors import ConfigError

#: Set by the first process for the processes Lightning's launcher starts, so they all use its run folder.
RUN_NAME_ENV = "FFF_RUN_NAME"


def launch_rank() -> int:
    """This process's global rank as its launcher set it, 0 when it is the only or the first process. Read from
    the environment, in Lightning's order: the process group does not exist yet. torchrun sets ``RANK``;
    Lightning's own launcher sets ``LOCAL_RANK`` (and ``NODE_RANK``) for the processes it starts, even inside a
    SLURM allocation it does not use; ``srun`` sets ``SLURM_PROCID``."""
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    if local or node:
        return local + node  # only zero-ness matters
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect() and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    return 0


#: The variables launchers and schedulers set to a process's rank.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def config_getter(cfg):
    """``get(key, default)`` of a config section: a jsonargparse Namespace, a dict or an object."""
    return cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)


def configured_processes(trainer_cfg) -> int:
    """How many processes the configured Trainer runs (devices per node times nodes), from the config alone, before
    the Trainer exists: ``devices`` as a count, a list, a comma-separated string, ``-1`` or ``auto`` (every GPU where
    the accelerator is one, else 1)."""
    get = config_getter(trainer_cfg)
    devices, accelerator = get("devices", "auto"), str(get("accelerator", "auto") or "auto")
    nodes = get("num_nodes", 1) or 1
    if isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1, "-1", None):
        import torch

        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        n = torch.cuda.device_count() if gpu else 1
    else:
        try:
            n = int(devices)
        except (TypeError, ValueError):
            return 1  # the Trainer refuses it
    try:
        return max(n, 1) * max(int(nodes), 1)
    except (TypeError, ValueError):
        return max(n, 1)


def stray_rank(trainer_cfg) -> str | None:
    """The rank variable of the environment a one-process run must not follow (``RANK=1`` left by a scheduler or a
    launcher's shell): its name and value, or ``None`` where the environment says this is the first process or the
    run has several."""
    if launch_rank() == 0 or configured_processes(trainer_cfg) > 1:
        return None
    for name in RANK_VARIABLES:
        if os.environ.get(name, "0") not in ("", "0"):
            return f"{name}={os.environ[name]}"
    return "the environment's rank"


class HostValue:
    """A value computed on the device, read on the host later without draining the device's queue: on a GPU a
    non-blocking copy to pinned memory and an event, so :meth:`get` waits only for the work queued before the
    value was made, never for the steps queued since (a plain ``bool(t)`` waits for all of them, and the GPU
    idles while the CPU prepares the next step)."""

    def __init__(self, value: torch.Tensor):
        self.event = None
        if value.is_cuda:
            self.host = value.to("cpu", non_blocking=True)  # lands in pinned memory
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = value

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def processes(trainer) -> int:
    """How many processes share the data: devices per node times nodes (known before the processes start)."""
    return int(trainer.num_devices) * int(trainer.num_nodes)


def check_strategy_name(strategy) -> None:
    """The same refusal as :func:`check_strategy`, from the configured value alone (a registered name or a
    ``class_path``), before even the Trainer is built."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

    if not isinstance(strategy, str):
        strategy = getattr(strategy, "class_path", None) or ""
    if strategy in StrategyRegistry:
        entry = StrategyRegistry[strategy]
        cls, start = entry["strategy"], entry.get("init_params", {}).get("start_method", "popen")
    else:
        name = strategy.rsplit(".", 1)[-1]
        cls = {"DDPStrategy": DDPStrategy, "SingleDeviceStrategy": SingleDeviceStrategy}.get(name)
        if cls is None and any(k in strategy.lower() for k in ("fsdp", "deepspeed", "xla", "parallel")):
            cls = type(name, (), {})  # named for the message below
        start = "popen"
        if cls is None:  # "auto", or a class this check does not know: the check on the built Trainer decides
            return
    _refuse(cls.__name__, cls in (DDPStrategy, SingleDeviceStrategy), start)


def _refuse(name: str, supported: bool, start: str) -> None:
    if not supported:
        raise ConfigError(
            "trainer.strategy",
            f"{name} is not supported: FFF/LoRA runs keep a whole (4-bit) copy of the base model on every device. "
            "Use trainer.strategy: ddp (or auto) with trainer.devices/num_nodes",
        )
    if start != "popen":
        raise ConfigError(
            "trainer.strategy",
            f"ddp_{start} is not supported: use trainer.strategy: ddp (Lightning starts one process per device by "
            "running the same command again), or torchrun/srun",
        )


def check_strategy(trainer) -> None:
    """Refuse, before anything loads, a strategy this tool cannot run: only one device or DDP (one process per
    device, started by Lightning's launcher, torchrun or SLURM) keep each process's 4-bit copy whole."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    name = type(strategy).__name__
    if type(strategy) is SingleDeviceStrategy:  # not its XLA/TPU subclasses
        return
    _refuse(name, type(strategy) is DDPStrategy, getattr(strategy, "_start_method", "popen"))
    if trainer._accelerator_connector.use_distributed_sampler and processes(trainer) > 1:
        raise ConfigError(
            "trainer.use_distributed_sampler",
            "must be false with several processes: FFFDataModule gives each process its own share of the data",
        )
