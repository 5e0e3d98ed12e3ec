"""The GPU memory a run may use: ``model.base.max_memory_gib``.

A number caps this process's CUDA allocator at that many GiB (``torch.cuda.set_per_process_memory_fraction``), so
a run can share a GPU or rehearse a smaller card (an N GB card leaves about N - 0.5 GiB after the CUDA context);
``auto`` is what the device has free now, less :data:`MARGIN_GIB`; ``None`` leaves the allocator alone. The cap is
checked against the device and applied in each process, on its own device, before any weight loads.
"""

from __future__ import annotations

import logging
import math

from fff_lightning.errors import ConfigError

log = logging.getLogger(__name__)
GIB = 1 << 30
#: What ``auto`` leaves free for other processes and the allocator's own slack.
MARGIN_GIB = 0.5


def check_value(value) -> None:
    """Refuse, from the config alone, a limit that is not ``None``, ``auto`` or a finite number > 0."""
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ConfigError(
            "model.base.max_memory_gib", f"must be a number of GiB > 0, auto or null (no cap); got {value!r}"
        )


def resolve(value, device) -> float | None:
    """The cap in GiB for ``device`` (a ``torch.device``), or ``None`` (no cap: the value is ``None``, or ``auto``
    where there is no GPU). A number larger than the device is refused in one line."""
    check_value(value)
    if value is None or getattr(device, "type", None) != "cuda":
        if value not in (None, "auto"):
            raise ConfigError("model.base.max_memory_gib", f"caps GPU memory, and this run is on {device}: leave "
                              "it out (or auto) on a CPU")  # fmt: skip
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    if value == "auto":
        cap = free / GIB - MARGIN_GIB
        if cap <= 0:
            raise ConfigError("model.base.max_memory_gib", f"auto: only {free / GIB:.2f} GiB free on {device}")
        return cap
    if value > total / GIB:
        raise ConfigError(
            "model.base.max_memory_gib", f"{value:g} GiB is more than {device} has ({total / GIB:.1f} GiB)"
        )
    return float(value)


def apply(cap_gib: float | None, device) -> None:
    """Cap this process's allocator on ``device`` at ``cap_gib`` (``None``: nothing to do)."""
    if cap_gib is None:
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    log.info("memory limit: %.2f GiB of %s's %.1f GiB (this process's allocator is capped)", cap_gib, device,
             total / GIB)  # fmt: skip


def plan(
    base,
    adapters,
    shape,
    trainable: int,
    optimizer: str,
    tokens: int,
    cap_gib: float,
    backend: str,
    dry_run: bool = False,
    packed_segments: bool = False,
):
    """The memory plan for a run whose cap is ``cap_gib`` (:mod:`fff_lightning.backends.memory_plan`); ``None``
    where the planner has no calibration for ``backend`` (only Unsloth has one; a ``dry_run`` plans ``auto`` as
    Unsloth) or for one of the run's adapter kinds (its ``planned_in_memory``). ``packed_segments``: packed rows
    attend one call per document (:mod:`fff_lightning.backends.packed_attention`). Nothing fits: one line that says
    what would."""
    from fff_lightning.backends import memory_plan as mp

    cal = mp.calibration(backend, dry_run)
    if cal is None or not all(k.planned_in_memory for k in adapters.kinds()):
        return None  # no calibration for this backend, or an adapter kind the planner does not model
    layout = mp.layout_of(shape, adapters, trainable, optimizer, base.load_in_4bit, packed_segments)
    try:
        return mp.choose(layout, tokens, cap_gib, cal)
    except mp.NoPlanFits as e:
        need = e.smallest.needs_gib()
        fit = mp.largest_fitting_tokens(layout, cap_gib, tokens, cal)
        change = (
            f"steps of up to {fit:,} tokens fit: make data.batch_size x model.base.max_seq_length (or, packed, "
            f"data.tokens_per_batch) at most {fit:,}"
            if fit
            else "the weights and adapters alone do not fit: a smaller model or fewer adapters"
        )
        raise ConfigError(
            "model.base.max_memory_gib",
            f"no memory plan fits {cap_gib:.2f} GiB with steps of {tokens:,} tokens (the smallest, "
            f"{e.smallest.describe()}, needs {need:.2f} GiB: a card of {math.ceil(need + MARGIN_GIB)} GB); {change}",
        ) from None


def planned_base(base, chosen):
    """``base`` with the plan's checkpointing and FFF recomputation."""
    from dataclasses import replace

    k = chosen.checkpointed
    return replace(
        base,
        gradient_checkpointing=k > 0,
        checkpoint_layers=None if k in (0, chosen.layers) else k,
        recompute_fff=chosen.recompute_fff,
    )
