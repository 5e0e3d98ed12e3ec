"""Adapter kinds as plug-ins: each kind is one module that says everything about itself, registered by name.

A kind is an :class:`AdapterKind` subclass with a config dataclass. Its name is the run config's key
(``model.<name>``) and the adapter folder's; the kind says how it is checked against a model's shape, put on a
model, told apart by its parameters' names, named in a run's legend, sized by ``budget --match`` and whether the
memory plan knows it. Counting, saving, reloading, checkpoints, ``sweep`` and ``report`` then work for it unchanged:
they go through :class:`~fff_lightning.spec.AdapterSpec`, which asks the registry.

Shipped kinds are the modules of this folder (``fff``, ``lora``, ``dora``, ``par_bn``); another package adds one
through the ``fff_lightning.adapter_kinds`` entry-point group. To add a kind, add a module here::

    @register
    class MyKind(AdapterKind):
        name = "mine"                    # model.mine in a config
        config = MyConfig                # a dataclass; its __post_init__ checks its fields
        match_field = "width"            # the int `budget --match mine` sets
        def owns(self, param: str) -> bool: ...
        def inject(self, model, cfg, shape, ctx): ...   # returns the model (in place or wrapped)
        def legend(self, cfg) -> str: ...

Kind modules import no heavy library at import time (torch only inside the methods that build layers), so
configs are read and checked without it. docs/adapters.md walks through one.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field

from fff_lightning.errors import ConfigError

#: The entry-point group through which other packages register kinds.
ENTRY_POINTS = "fff_lightning.adapter_kinds"
#: Keys of an adapter folder's JSON (and of a checkpoint's adapter record) that are not kinds.
NOT_KINDS = ("format_version", "base_model", "parameters")

_REGISTRY: dict[str, AdapterKind] = {}
_ORDERED: list[AdapterKind] = []
_LOADED: list[bool] = []


@dataclass
class Injection:
    """What kinds put on a model before this one left for the later ones: the modules they wrapped (a later kind
    targets what is inside the wrapper, never the wrapper itself), and the backend's own LoRA adder, if any."""

    wrapped: list[str] = field(default_factory=list)
    #: ``(model, lora_config, wrapped) -> model``: the backend's way to add LoRA (Unsloth's ``get_peft_model``)
    add_lora: object = None
    seed: int | None = None


class AdapterKind:
    """One kind of adapter. Subclasses set the class attributes and implement :meth:`owns`, :meth:`inject` and
    :meth:`legend`; the rest have defaults."""

    #: the config key (``model.<name>``), the folder key, the budget row
    name: str = ""
    #: the config dataclass (checks its fields in ``__post_init__``)
    config: type = object
    #: a short title for tables (``budget``)
    title: str = ""
    #: kinds are put on a model in this order, lowest first (FFF wraps projections before LoRA names their inside)
    order: int = 50
    #: kinds this one cannot share a model with
    excludes: tuple[str, ...] = ()
    #: the int field ``budget --match <name>`` sets to meet a budget; ``None``: not matchable
    match_field: str | None = None
    #: the matched run holds this kind alone (a baseline), else the run's other adapters stay as given
    match_alone: bool = True
    #: the memory plan (``model.base.max_memory_gib``) is calibrated for this kind
    planned_in_memory: bool = False
    #: it works through a forward hook on the MLP module (backends that bypass the module refuse it)
    hooks_mlp: bool = False

    def owns(self, param: str) -> bool:
        """Whether a parameter (by its name in the adapted model) is one of this kind's."""
        raise NotImplementedError

    def check(self, cfg, shape) -> None:
        """Refuse, before anything loads, what the model (a ``transformers`` config) does not have (e.g. layers)."""
        layers = getattr(cfg, "layers", None)
        if layers is not None:
            from fff_lightning.checks import parse_layers

            parse_layers(layers, shape.num_hidden_layers, f"model.{self.name}.layers")

    def inject(self, model, cfg, shape, ctx: Injection):
        """Put the adapter on ``model`` (a loaded or meta-device causal LM); returns the model to go on with."""
        raise NotImplementedError

    def legend(self, cfg) -> str:
        """This kind's part of a run's name (``lora-r46``)."""
        raise NotImplementedError

    def with_size(self, cfg, value: int):
        """``cfg`` with :attr:`match_field` set to ``value`` (what ``budget --match`` tries)."""
        return dataclasses.replace(cfg, **{self.match_field: value})

    def default(self):
        """The config ``budget --match <name>`` starts from when the run has no such adapter."""
        return self.config()


def register(cls: type[AdapterKind]) -> type[AdapterKind]:
    """Class decorator: make ``cls`` the kind of its ``name`` (one kind per name)."""
    kind = cls()
    if not kind.name or not kind.name.isidentifier() or kind.name in NOT_KINDS:
        raise ValueError(f"an adapter kind needs a name that is an identifier, not {kind.name!r}")
    other = _REGISTRY.get(kind.name)
    if other is not None and type(other).__qualname__ != cls.__qualname__:
        raise ValueError(f"two adapter kinds are named {kind.name!r}: {type(other).__module__} and {cls.__module__}")
    _REGISTRY[kind.name] = kind
    _ORDERED.clear()  # sorted again on the next kinds()
    return cls


def _load() -> None:
    """Import every kind module of this folder and every registered entry point, once."""
    if _LOADED:
        return
    _LOADED.append(True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    import logging
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in is named and left out; the shipped kinds still work
            logging.getLogger(__name__).warning("adapter kind plug-in %s (%s) failed to load and is left out: %s: %s",
                                                ep.name, ep.value, type(e).__name__, e)  # fmt: skip


def kinds() -> list[AdapterKind]:
    """Every registered kind, in the order they are put on a model (asked once per parameter name when a model's
    adapters are told apart: sorted once per registration, not per call)."""
    _load()
    if not _ORDERED:
        _ORDERED[:] = sorted(_REGISTRY.values(), key=lambda k: (k.order, k.name))
    return list(_ORDERED)


def names() -> list[str]:
    return [k.name for k in kinds()]


def get(name: str) -> AdapterKind:
    """The kind called ``name``; one line naming the known ones otherwise."""
    _load()
    if name not in _REGISTRY:
        raise ConfigError(f"model.{name}", f"no adapter kind {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def kind_of(param: str, present: list[str] | None = None) -> str | None:
    """The kind a parameter belongs to (among ``present`` kinds, else any), ``None`` for a frozen base parameter."""
    for kind in kinds():
        if (present is None or kind.name in present) and kind.owns(param):
            return kind.name
    return None
