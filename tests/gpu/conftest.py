import os
from pathlib import Path

import pytest
import torch

from fff_lightning.loading import preimport_unsloth

preimport_unsloth()  # before anything imports transformers


@pytest.fixture(scope="session")
def random_mistral_7b(tmp_path_factory):
    """A folder holding a random-weight Mistral-7B (the real shape) and the Mistral tokenizer, in bf16.

    No hub is reachable on the GPU machine; speed and memory do not depend on the weights' values (losses do:
    quote none from this model). ``FFF_7B_DIR`` reuses a folder built earlier.
    """
    folder = Path(os.environ.get("FFF_7B_DIR") or tmp_path_factory.mktemp("mistral7b"))
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, MistralConfig

        from fff_lightning.tokenizer import load_tokenizer

        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(MistralConfig(), dtype=torch.bfloat16)
        model.save_pretrained(folder)
        load_tokenizer(None).save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    return folder
