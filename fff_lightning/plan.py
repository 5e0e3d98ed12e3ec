"""A run resolved once: :func:`plan_run` turns a run's model settings into a frozen :class:`RunPlan` before the
Trainer or the model exists, and everything after only reads it.

The plan holds the base model and its shape (read once, without weights), the adapters (resolved once: the
config's sections or a saved adapter folder, which then decides), their budget (counted once on the meta device)
and what every check that needs no weight concluded (layers, ranks, sizes, a saved folder's header). ``fit``,
``validate``, ``test`` and ``predict`` build it in the CLI before any class is instantiated and hand it to
:class:`~fff_lightning.module.FFFModule` (which then neither resolves nor checks again), to the budget guard and to
the loader; ``budget``, ``sweep`` and ``bench`` count through the same functions. A module built from Python plans
itself, once, on first use.

Two facts exist only once ``fit`` has started, and are bound into the plan then, in one place
(:meth:`FFFModule.setup <fff_lightning.module.FFFModule.setup>`): each process's own device (the memory cap it can
give) and the prepared data's largest step; :meth:`RunPlan.with_memory` turns them into the memory plan, and the
model loads with :attr:`RunPlan.loaded_base` (the config's checkpointing replaced by the plan's; the config is never
rewritten). The CLI adds the run folder it opened (:meth:`RunPlan.in_folder`), where the callbacks write.

The data's facts are the data module's :class:`~fff_lightning.data.plan.DataPlan` (the config's bound before any
data is read, the prepared data's validation sets, steps and largest step after): the module, the memory planner and
``budget --memory`` read that, not the data module's attributes.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

from fff_lightning.spec import AdapterSpec, BaseModelConfig, Budget

#: The plan the CLI made for the module it is about to instantiate (see :func:`planned`).
_PLANNED: ContextVar[RunPlan | None] = ContextVar("fff_lightning_planned", default=None)


@dataclass(frozen=True)
class RunPlan:
    """What a run is, resolved and checked once (read-only).

    Attributes:
        base: the base model and backend.
        shape: its ``transformers`` config (no weights).
        adapters: which adapters, with their configs.
        adapter_path: the saved adapter folder the run starts from, if any (already checked against ``shape``).
        budget: the adapters' parameter counts on ``shape``.
        run_dir: the run folder the CLI opened for it (``None`` for a module built from Python).
        memory: the memory plan for the run's cap (:mod:`fff_lightning.backends.memory_plan`), bound by
            :meth:`with_memory` once the process's device and the prepared data's largest step are known; ``None``
            without a cap, or where the planner has no model of the run.
    """

    base: BaseModelConfig
    shape: object
    adapters: AdapterSpec
    adapter_path: str | None
    budget: Budget
    run_dir: Path | None = None
    memory: object | None = None

    def checkpoint_bytes(self, optimizer_state_bytes: int) -> int:
        """About how large a checkpoint is: the adapters (fp32) and ``optimizer_state_bytes`` per parameter."""
        return self.budget.trainable * (4 + optimizer_state_bytes)

    @property
    def loaded_base(self) -> BaseModelConfig:
        """The base model as it loads: the config's, with the memory plan's checkpointing when one was chosen (the
        config itself is never rewritten)."""
        from fff_lightning import memory

        return self.base if self.memory is None else memory.planned_base(self.base, self.memory)

    def in_folder(self, run_dir) -> RunPlan:
        """This plan, run in ``run_dir``."""
        return replace(self, run_dir=Path(run_dir))

    def with_memory(
        self, cap_gib: float, optimizer: str, step_tokens: int, packed_segments: bool = False
    ) -> tuple[RunPlan, str | None]:
        """This plan with the memory plan for a cap of ``cap_gib`` GiB and steps of up to ``step_tokens`` tokens
        (``packed_segments``: packed rows that attend one call per document), or one line when no memory plan fits
        (:class:`~fff_lightning.errors.ConfigError`); and why none was chosen where the planner has no model of
        this run (``None`` when one was)."""
        from fff_lightning import backends, memory

        chosen = memory.plan(self.base, self.adapters, self.shape, self.budget.trainable, optimizer, step_tokens,
                             cap_gib, backends.resolve(self.base.backend),
                             packed_segments=packed_segments)  # fmt: skip
        if chosen is not None:
            return replace(self, memory=chosen), None
        unplanned = [k.name for k in self.adapters.kinds() if not k.planned_in_memory]
        why = (f"the planner does not model the {unplanned[0]} adapter" if unplanned
               else "the planner is calibrated for the unsloth backend only")  # fmt: skip
        return self, why


def plan_run(base: BaseModelConfig, adapters: AdapterSpec, adapter_path: str | None = None) -> RunPlan:
    """Read the base model's shape and run every check that needs no weight, once: the base model's limits, the
    adapters' layers, ranks and size, and a saved adapter folder's header against the adapters it describes."""
    from fff_lightning.adapters import adapter_shapes, check_adapter_folder, check_size

    shape = base.shape()
    base.check(shape)
    adapters.check(shape)
    budget = check_size(adapters, shape)
    if adapter_path is not None:
        check_adapter_folder(adapter_path, adapter_shapes(adapters, shape), shape)
    return RunPlan(base, shape, adapters, None if adapter_path is None else str(adapter_path), budget)


@contextmanager
def planned(plan: RunPlan):
    """Within this block, a module built for ``plan``'s base model and adapter folder takes ``plan`` (the CLI's)."""
    token = _PLANNED.set(plan)
    try:
        yield
    finally:
        _PLANNED.reset(token)


def current(base: BaseModelConfig, adapter_path, configs: dict) -> RunPlan | None:
    """The plan the CLI made, if it is this module's: the same base model and adapter folder and, without a folder,
    the same adapter sections (``configs``: ``{kind: config or None}``)."""
    plan = _PLANNED.get()
    path = None if adapter_path is None else str(adapter_path)
    if plan is None or plan.base != base or plan.adapter_path != path:
        return None
    if path is None and AdapterSpec(**configs) != plan.adapters:
        return None
    return plan
