import os
import tempfile

import pytest

# Keep what the tests build (tokenizer folder, tiny models) out of the user's cache, and never touch a hub.
os.environ.setdefault("FFF_CACHE", tempfile.mkdtemp(prefix="fff-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny():
    """The tiny base model's config (float32, no quantisation, no checkpointing): fast on a CPU."""
    from fff_lightning.loading import BaseModelConfig

    return BaseModelConfig(backend="tiny", load_in_4bit=False, dtype="float32", gradient_checkpointing=False)


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 32000, (2, 12), generator=g)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
