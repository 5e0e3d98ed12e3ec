"""LoRA through PEFT, composed with FFF in the order that also works under Unsloth.

Order: load (4-bit) -> k-bit preparation -> :func:`fff_lightning.fff.inject_fff` -> :func:`apply_lora`. LoRA's
``target_modules`` is a regex that names the *inner* projection of FFF-wrapped layers
(``...mlp.up_proj.base_proj``), so the LoRA delta on ``up_proj`` also sees FFF's output; the wrappers
themselves are excluded (PEFT cannot wrap them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fff_lightning.errors import ConfigError
from fff_lightning.fff import INNER, parse_layers

#: The seven linear modules of a Mistral decoder layer; the research put LoRA on all of them.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BLOCK_OF = {m: "self_attn" for m in ALL_LINEAR[:4]} | {m: "mlp" for m in ALL_LINEAR[4:]}

#: The research's presets: (rank, alpha). ``lora``/``lora2`` come from its step-1 sweeps, ``r24`` is the LoRA
#: beside FFF in step 2, ``r46`` the LoRA-only baseline of equal budget.
LORA_PRESETS: dict[str, tuple[int, float]] = {"lora": (16, 8), "lora2": (32, 16), "r24": (24, 12), "r46": (46, 23)}


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

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in LORA_PRESETS:
            raise ConfigError("lora.preset", f"unknown preset {self.preset!r}; allowed: {', '.join(LORA_PRESETS)}")
        r = self.rank
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError("lora.r", f"must be a positive int; got {self.r!r}")
        if not self.lora_alpha > 0:
            raise ConfigError("lora.alpha", f"must be > 0; got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("lora.dropout", f"must be in [0, 1); got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules", f"name at least one of {', '.join(ALL_LINEAR)}")
        for m in self.target_modules:
            if m not in ALL_LINEAR:
                raise ConfigError("lora.target_modules", f"unknown module {m!r}; allowed: {', '.join(ALL_LINEAR)}")
        if not (isinstance(self.layers, str) and self.layers.strip().lower() == "all"):
            parse_layers(self.layers, None, "lora.layers")

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

    def n_params(self, hidden_size: int, n_layers: int, shapes: dict[str, tuple[int, int]]) -> int:
        """Closed form: ``r * (in + out)`` per targeted module; ``shapes`` maps module name to (in, out)."""
        per_layer = sum(self.rank * sum(shapes[m]) for m in self.target_modules)
        return per_layer * len(parse_layers(self.layers, n_layers, "lora.layers"))

    def legend(self) -> str:
        return f"lora{self.rank}"

    def target_regex(self, n_layers: int) -> str:
        """A PEFT ``target_modules`` regex for the chosen modules and layers, FFF's inner projection included."""
        idx = parse_layers(self.layers, n_layers, "lora.layers")
        layer_alt = r"\d+" if len(idx) == n_layers else "|".join(map(str, idx))
        blocks = sorted({_BLOCK_OF[m] for m in self.target_modules})
        return rf".*\.layers\.({layer_alt})\.({'|'.join(blocks)})\.({'|'.join(self.target_modules)})(\.{INNER})?$"

    def peft_kwargs(self, n_layers: int, wrapped: list[str]) -> dict:
        """Arguments shared by ``peft.LoraConfig`` and Unsloth's ``get_peft_model``."""
        return dict(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_regex(n_layers),
            # FFF wrappers match the regex by name but are not layers PEFT can wrap; their inner projection is.
            exclude_modules=list(wrapped) or None,
            bias="none",
            use_rslora=self.use_rslora,
        )


def apply_lora(model: nn.Module, cfg: LoRAConfig, n_layers: int, wrapped: list[str]) -> nn.Module:
    """Add LoRA with plain PEFT; returns the ``PeftModel``. ``wrapped`` is what ``inject_fff`` returned."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", **cfg.peft_kwargs(n_layers, wrapped))
    return get_peft_model(model, config, autocast_adapter_dtype=True)
