"""The ``hf`` backend: transformers, in bf16/fp32 or bitsandbytes nf4 4-bit with double quantisation, and PEFT's
LoRA. The one place that builds the nf4 quantisation config."""

from __future__ import annotations

import pickle

import torch
from torch import nn

from fff_lightning.backends import Backend
from fff_lightning.errors import ConfigError
from fff_lightning.tokenizer import load_tokenizer


def nf4_config(dtype: torch.dtype):
    """bitsandbytes nf4 with double quantisation, computing in ``dtype`` (QLoRA's setting; the research's)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def device_map() -> dict:
    """The whole model on this process's device: under Lightning (one device or DDP, whatever the launcher:
    its own, torchrun, SLURM) the strategy has made it the current CUDA device before the model is configured,
    so each process loads its own (4-bit) copy onto its own GPU."""
    if torch.cuda.is_available():
        return {"": torch.device("cuda", torch.cuda.current_device())}
    return {"": "cpu"}


def disable_bnb_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes 0.50.2 on AVX512-BF16 CPUs repacks every ``Linear4bit`` after one forward under
    ``torch.inference_mode()`` (what Lightning's validation uses), and gradients then stop flowing through it.
    Switching that path off on each module keeps training correct after validation."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_pretrained(path: str, load_in_4bit: bool, dtype: torch.dtype) -> nn.Module:
    """A causal LM from a hub id or folder onto this process's device, in nf4 (prepared for k-bit training) or not."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(dtype=dtype, device_map=device_map())
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met a Python object it will not build
        raise refused_pickle(path, e) from None
    except OSError as e:  # no network, an unknown id, a gated repository, a folder without weights
        raise ConfigError(
            "model.base.name_or_path",
            f"cannot load {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); check the id, the network "
            "and access, or give a local folder; offline (HF_HUB_OFFLINE), fetch it first where the network is: "
            "`python -m fff_lightning download --config <this run's config>`",
        ) from None
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        disable_bnb_cpu_repack(model)
    return model


def refused_pickle(path: str, e: Exception) -> ConfigError:
    """The one line for weights in a pickle file that holds more than tensors: never loaded (it could run code)."""
    import re

    named = re.search(r"GLOBAL (\S+)", str(e))
    what = f"it calls {named.group(1)}" if named else type(e).__name__
    return ConfigError(
        "model.base.name_or_path",
        f"{path}: its weights file (a pickle, e.g. pytorch_model.bin) holds Python objects, not only tensors, and is "
        f"not loaded: loading it could run its code ({what[:80]}). Give weights as safetensors "
        "(converted where you trust the file)",
    )


class HF(Backend):
    name = "hf"

    def load(self, base, dtype):
        path = self.model_path(base)
        return load_pretrained(path, base.load_in_4bit, dtype), load_tokenizer(base.tokenizer or path)


BACKEND = HF()
