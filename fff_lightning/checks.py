"""Checks every config field shares: one allowed value of several, a positive int, a set of decoder layers.

The lowest layer of the package (it imports only :mod:`fff_lightning.errors`): the run's description
(:mod:`fff_lightning.spec`), the adapter kinds (:mod:`fff_lightning.kinds`) and the data configs check their fields
through it, so a bad value reads the same wherever it is given, naming the field as a YAML config writes it.
"""

from __future__ import annotations

import re

from fff_lightning.errors import ConfigError

#: Stated bounds for sizes the model does not bound itself (each far above any real run's).
MAX_LAYER_INDEX = 9_999  # no decoder has 10,000 layers; the model's own count is checked once it is known


def choice(name: str, value, allowed) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming the field and every allowed value."""
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(name, f"must be a positive int; got {value!r}")


def is_all(spec) -> bool:
    return spec is None or (isinstance(spec, str) and spec.strip().lower() == "all")


def parse_layers(
    spec: str | int | list[int] | None, n_layers: int | None = None, field_name: str = "layers"
) -> list[int]:
    """Turn ``"all"``, ``"13-19"``, ``"0,2,5-7"``, ``7`` or ``[13, 14]`` into a sorted list of layer indices.

    Ranges are inclusive, as people say them ("layers 13-19" is seven layers). With ``n_layers`` the indices
    are checked against the model and ``"all"`` is expanded.
    """
    if is_all(spec):
        if n_layers is None:
            raise ConfigError(field_name, '"all" needs the model\'s number of layers')
        return list(range(n_layers))
    if isinstance(spec, bool):
        raise ConfigError(field_name, f"expected 'all', a range like '13-19', or a list of ints; got {spec!r}")
    limit = n_layers if n_layers is not None else MAX_LAYER_INDEX + 1

    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        if len(spec) > 10_000:
            raise ConfigError(field_name, f"is {len(spec):,} characters long: give a range like '13-19'")
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d{1,12})\s*-\s*(\d{1,12})", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ConfigError(field_name, f"range {part!r} runs backwards")
                if hi >= limit:
                    bad = list(range(max(lo, limit), min(hi, limit + 5) + 1))
                    if n_layers is None:
                        raise ConfigError(field_name, f"range {part!r} is beyond any model (at most {MAX_LAYER_INDEX})")
                    raise ConfigError(
                        field_name,
                        f"layer(s) {bad}{'...' if hi > limit + 5 else ''} do not exist: the model has {n_layers} "
                        f"layers (0-{n_layers - 1})",
                    )
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\d{1,12}", part):
                items.append(int(part))
            else:
                raise ConfigError(field_name, f"cannot read {part!r}: use 'all', '13-19', '0,2,5-7' or a list of ints")
    else:
        if isinstance(spec, (list, tuple)) and len(spec) > limit:
            raise ConfigError(field_name, f"lists {len(spec):,} layers; the model has at most {limit}")
        if not isinstance(spec, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in spec):
            raise ConfigError(field_name, f"expected 'all', a range like '13-19', or a list of ints; got {spec!r}")
        items = list(spec)
    if any(i < 0 for i in items):
        raise ConfigError(field_name, f"layer indices must be >= 0; got {sorted(items)}")
    if n_layers is None and items and max(items) > MAX_LAYER_INDEX:
        raise ConfigError(field_name, f"layer {max(items)} is beyond any model (at most {MAX_LAYER_INDEX})")
    if not items:
        raise ConfigError(field_name, "selects no layer")
    if n_layers is not None and max(items) >= n_layers:
        bad = sorted(i for i in set(items) if i >= n_layers)
        raise ConfigError(
            field_name, f"layer(s) {bad} do not exist: the model has {n_layers} layers (0-{n_layers - 1})"
        )
    return sorted(set(items))
