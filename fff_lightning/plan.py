"""A run resolved once: :func:`plan_run` turns a run's model settings into a frozen :class:`RunPlan` before the
Trainer or the model exists, and everything after only reads it.

The plan holds the base model and its shape (read once, without weights), the adapters (resolved once: the
config's sections or a saved adapter folder, which then decides), their budget (counted once on the meta device)
and what every check that needs no weight concluded (layers, ranks, sizes, a saved folder's header). ``fit``,
``validate``, ``test`` and ``predict`` build it in the CLI before any class is instantiated and hand it to
:class:`~fff_lightning.module.FFFModule` (which then neither resolves nor checks again), to the budget guard and to
the loader; ``budget``, ``sweep`` and ``bench`` count through the same functions. A module built from Python plans
itself, once, on first use.

The data's facts are the data module's :class:`~fff_lightning.data.plan.DataPlan` (the config's bound before any
data is read, the prepared data's validation sets, steps and largest step after): the module, the memory planner and
``budget --memory`` read that, not the data module's attributes.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

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
    """

    base: BaseModelConfig
    shape: object
    adapters: AdapterSpec
    adapter_path: str | None
    budget: Budget

    def checkpoint_bytes(self, optimizer_state_bytes: int) -> int:
        """About how large a checkpoint is: the adapters (fp32) and ``optimizer_state_bytes`` per parameter."""
        return self.budget.trainable * (4 + optimizer_state_bytes)


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
