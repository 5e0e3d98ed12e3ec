"""The LoRA kind, through PEFT: its config (``model.lora``), the research's presets, and how it is put on a model.

LoRA goes on after FFF (see :mod:`fff_lightning.kinds.fff`). Its ``target_modules`` is a regex that names the
*inner* projection of FFF-wrapped layers (``...mlp.up_proj.base_proj``), so the LoRA delta on ``up_proj`` also
sees FFF's output; the wrappers themselves are excluded (PEFT cannot wrap them). A backend may add LoRA its own way
(Unsloth's ``get_peft_model``) with the same arguments (:func:`peft_kwargs`). ``budget --match lora`` gives the
LoRA-alone run of a budget (its rank; alpha keeps r/2 unless fixed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fff_lightning.checks import choice, is_all, parse_layers, positive_int
from fff_lightning.errors import ConfigError
from fff_lightning.kinds import AdapterKind, Injection, register
from fff_lightning.kinds.fff import INNER

#: The seven linear modules of a Mistral decoder layer; the research put LoRA on all of them.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The research's LoRA presets: (rank, alpha). ``lora``/``lora2`` come from its step-1 sweeps, ``r24`` is the LoRA
#: beside FFF in step 2, ``r46`` the LoRA-only baseline of about the same budget.
LORA_PRESETS: dict[str, tuple[int, float]] = {"lora": (16, 8), "lora2": (32, 16), "r24": (24, 12), "r46": (46, 23)}
_BLOCK_OF = {m: "self_attn" for m in ALL_LINEAR[:4]} | {m: "mlp" for m in ALL_LINEAR[4:]}


@dataclass
class LoRAConfig:
    """What LoRA adapter to build (PEFT ``LoraConfig`` underneath).

    Attributes:
        preset: a research preset (``lora``: r16/alpha8, ``lora2``: r32/alpha16, ``r24``: r24/alpha12,
            ``r46``: r46/alpha23) that fills ``r`` and ``alpha``; explicit ``r``/``alpha`` override it.
        r: rank. Without a preset and without ``r``: 16.
        alpha: scaling numerator (PEFT ``lora_alpha``). Without a preset and without ``alpha``: ``r / 2``, the
            research's ratio.
        dropout: dropout on LoRA's input.
        target_modules: which linear modules of each decoder layer get LoRA.
        layers: decoder layers that get LoRA: ``"all"``, ``"13-19"``, ``"0,2,5-7"`` or a list of ints.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    preset: str | None = None
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    layers: str | int | list[int] = "all"
    use_rslora: bool = False

    #: how its fields are named in messages (a subclass, e.g. DoRA's, names its own section)
    _field = "model.lora"

    def __post_init__(self) -> None:
        if self.preset is not None:
            choice(f"{self._field}.preset", self.preset, LORA_PRESETS)
        positive_int(f"{self._field}.r", self.rank)
        if not self.lora_alpha > 0:
            raise ConfigError(f"{self._field}.alpha", f"must be > 0; got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{self._field}.dropout", f"must be in [0, 1); got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(f"{self._field}.target_modules", f"name at least one of {', '.join(ALL_LINEAR)}")
        for m in self.target_modules:
            choice(f"{self._field}.target_modules", m, ALL_LINEAR)
        if not is_all(self.layers):
            parse_layers(self.layers, None, f"{self._field}.layers")

    @property
    def rank(self) -> int:
        if self.r is not None:
            return self.r
        return LORA_PRESETS[self.preset][0] if self.preset else 16

    @property
    def lora_alpha(self) -> float:
        if self.alpha is not None:
            return self.alpha
        if self.preset and self.r is None:
            return LORA_PRESETS[self.preset][1]
        return self.rank / 2


def target_regex(cfg: LoRAConfig, n_layers: int) -> str:
    """A PEFT ``target_modules`` regex for the chosen modules and layers, FFF's inner projection included."""
    idx = parse_layers(cfg.layers, n_layers, f"{cfg._field}.layers")
    layer_alt = r"\d+" if len(idx) == n_layers else "|".join(map(str, idx))
    blocks = sorted({_BLOCK_OF[m] for m in cfg.target_modules})
    # never a vision tower's layers (a multimodal model's encoder names its attention projections alike)
    return (
        rf"(?!.*vision).*\.layers\.({layer_alt})\.({'|'.join(blocks)})\.({'|'.join(cfg.target_modules)})(\.{INNER})?$"
    )


def peft_kwargs(cfg: LoRAConfig, n_layers: int, wrapped: list[str]) -> dict:
    """Arguments shared by ``peft.LoraConfig`` and Unsloth's ``get_peft_model``."""
    return dict(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg, n_layers),
        # FFF wrappers match the regex by name but are not layers PEFT can wrap; their inner projection is.
        exclude_modules=list(wrapped) or None,
        bias="none",
        use_rslora=cfg.use_rslora,
    )


def apply_lora(model, cfg: LoRAConfig, n_layers: int, wrapped: list[str], **extra):
    """Add LoRA with plain PEFT; returns the ``PeftModel``. ``wrapped``: the modules earlier kinds wrapped."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", **peft_kwargs(cfg, n_layers, wrapped), **extra)
    return get_peft_model(model, config, autocast_adapter_dtype=True)


@register
class LoRAKind(AdapterKind):
    name = "lora"
    config = LoRAConfig
    title = "LoRA"
    order = 30
    excludes = ("dora",)  # both are PEFT LoRA layers on the same modules
    match_field = "r"
    planned_in_memory = True

    def owns(self, param: str) -> bool:
        return ".lora_" in param

    def check(self, cfg: LoRAConfig, shape) -> None:
        parse_layers(cfg.layers, shape.num_hidden_layers, f"{cfg._field}.layers")

    def inject(self, model, cfg: LoRAConfig, shape, ctx: Injection):
        if ctx.add_lora is not None:  # the backend's own (Unsloth's get_peft_model)
            return ctx.add_lora(model, cfg, ctx.wrapped)
        return apply_lora(model, cfg, shape.num_hidden_layers, ctx.wrapped)

    def legend(self, cfg: LoRAConfig) -> str:
        return f"lora-r{cfg.rank}"

    def with_size(self, cfg: LoRAConfig, value: int) -> LoRAConfig:
        return replace(cfg, preset=None, r=value, alpha=cfg.alpha)  # alpha r/2 unless the config fixes it
