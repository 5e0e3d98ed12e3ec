import os
import sys
from pathlib import Path

import pytest

from fff_lightning.backends import preimport_unsloth

preimport_unsloth()  # before anything imports transformers
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def random_mistral_7b(tmp_path_factory):
    """A folder holding a random-weight Mistral-7B (the real shape) and the Mistral tokenizer, in bf16.

    No hub is reachable on the GPU machine; speed and memory do not depend on the weights' values (losses do:
    quote none from this model). ``FFF_7B_DIR`` reuses a folder built earlier.
    """
    from make_random_7b import make

    return make(Path(os.environ.get("FFF_7B_DIR") or tmp_path_factory.mktemp("mistral7b")))
