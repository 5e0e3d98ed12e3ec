"""A trained run's model for inference, shared by ``evaluate``, ``generate``/``chat`` and ``export``: the run's saved
config read for its model and data alone, the base model with its adapters as ``fit`` built them (unmerged), the KV
cache back on, on the GPU where there is one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: The sections of a run's saved config.yaml that inference reads (the rest is ``fit``'s: trainer, ckpt_path...).
READ = ("model", "data", "experiment")


def run_config(path: str, keep: list[str]) -> str:
    """A run's saved config.yaml (it has ``ckpt_path``: ``fit`` wrote it) reduced to what inference reads, as a
    temporary copy (listed in ``keep`` for removal); any other config as given."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) if p.is_file() and p.stat().st_size < 1 << 20 else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return path  # read and reported by the config parser
    if not isinstance(data, dict) or "ckpt_path" not in data:
        return path
    kept = {k: v for k, v in data.items() if k in READ}
    if isinstance(kept.get("model"), dict):  # a run started from other adapters saved theirs: only --model.
        kept["model"] = {k: v for k, v in kept["model"].items() if k != "adapter_path"}  # adapter_path scores
    fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="fff-run-")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(kept, f)
    keep.append(tmp)
    return tmp


def describe(configs: list[str], overrides: list[str]):
    """The run the configs describe (:func:`~fff_lightning.run_config.describe_run`), a run's saved config.yaml read
    for its model and data alone."""
    from fff_lightning.run_config import describe_run

    temporary: list[str] = []
    try:
        return describe_run(*[run_config(c, temporary) for c in configs], overrides=overrides)
    finally:
        for t in temporary:
            os.unlink(t)


def model_of(module, adapters: bool):
    """The run's model in memory (with its adapters), or the base model alone; in eval mode, on the GPU where
    there is one (a model loaded in 4-bit is there already)."""
    import torch

    if adapters:
        module.configure_model()
        model, tokenizer = module.model, module.tokenizer
    else:
        from fff_lightning import backends
        from fff_lightning.loading import compute_dtype

        backend = backends.get(module.loaded_base.backend)
        backend.check_available()
        model, tokenizer = backend.load(module.loaded_base, compute_dtype(module.loaded_base))
    # Generation reuses its keys and values: a run trained with gradient checkpointing turned the cache off
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        model = model.to("cuda")
    return model.eval(), tokenizer


def base_name(module) -> str:
    """The base model a module loads, as its backend names it (hub id, folder or file)."""
    from fff_lightning import backends

    return backends.get(module.loaded_base.backend).model_name(module.loaded_base)


def is_run(folder: Path) -> bool:
    """Whether ``folder`` is a finished run folder (its config.yaml and trained adapters)."""
    return (folder / "config.yaml").is_file() and (folder / "adapter" / "fff_adapter_config.json").is_file()


def run_model(folder: Path, overrides: list[str] = ()):
    """``(model, tokenizer, text style)`` of the run in ``folder``: its base model with its trained adapters,
    unmerged; the style its data was written in (``chat_template``: the tokenizer then carries the run's own
    template; ``research``)."""
    described = describe([str(folder / "config.yaml")], ["--model.adapter_path", str(folder / "adapter"),
                                                           *overrides])  # fmt: skip
    model, tokenizer = model_of(described.model, adapters=True)
    opts = described.datamodule.opts
    if opts.style == "chat_template" and opts.chat_template:  # the template the run's data was written with
        tokenizer.chat_template = opts.chat_template
    return model, tokenizer, opts.style
