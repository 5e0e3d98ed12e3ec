"""Hub datasets and models from a pre-downloaded hub cache, offline: the research's four repositories in their real
file layouts (tests/fake_hub.py), a tiny model under a hub id, and the one-line messages when a file is missing."""

import os
import subprocess
import sys
from pathlib import Path

import fake_hub
import pytest
import yaml
from helpers import ENV, QUICK

from fff_lightning.data import hub
from fff_lightning.data.sources import research_sources
from fff_lightning.errors import ConfigError

TINY_REPO = "fff-test/tiny-mistral"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    from fff_lightning.backends.tiny import tiny_model_dir
    from fff_lightning.run_config import describe_run

    root = tmp_path_factory.mktemp("hub")
    fake_hub.research_datasets(root / "hub", rows=60)
    fake_hub.model(root / "hub", TINY_REPO, tiny_model_dir(describe_run(QUICK).model.base))
    return root


@pytest.fixture
def offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    return cache


def test_the_research_defaults_resolve_to_their_files_in_the_hub_cache(offline):
    got = {}
    for src in research_sources():  # the step configs' defaults, as they are
        for split in dict.fromkeys([src.train_split, src.val_split]):
            got[(src.path, split)] = [f.name for f in hub.resolve(src.path, split).files]
    assert got == {
        ("meta-math/MetaMathQA", "train"): ["MetaMathQA-395K.json"],
        ("ise-uiuc/Magicoder-OSS-Instruct-75K", "train"): ["data-oss_instruct-decontaminated.jsonl"],
        ("HuggingFaceH4/ultrachat_200k", "train_sft"): [
            "train_sft-00000-of-00003-a3ecf92756993583.parquet",
            "train_sft-00001-of-00003-0a1804bcb6ae68c6.parquet",
            "train_sft-00002-of-00003-ee46ed25cfae92c6.parquet",
        ],
        ("HuggingFaceH4/ultrachat_200k", "test_sft"): ["test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet"],
        ("freecs/ArtificialThinkerSet", "train"): ["train-00000-of-00001-0c1b2a3d4e5f6071.parquet"],
    }


def test_which_files_make_a_split_follows_the_datasets_conventions():
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/tr-*\n---\n"
    assert hub.card_splits(card) == {"train": ["data/tr-*"]}
    assert hub.card_splits("---\nconfigs:\n- config_name: x\n  data_files: all/*.jsonl\n---\n") == {
        "train": ["all/*.jsonl"]
    }
    assert hub.card_splits("# no front matter") is None and hub.card_splits("---\nlicense: mit\n---\n") is None
    files = ["README.md", ".hidden/x.jsonl", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    files += ["data/validation-00000-of-00001.parquet"]
    assert hub.split_patterns(files, None).keys() == {"train", "validation"}
    assert hub.split_files("r", files, None, "train") == files[2:4]
    assert hub.split_files("r", ["a/train.jsonl", "a/test.jsonl"], None, "test") == ["a/test.jsonl"]
    assert hub.split_files("r", ["one.json", "README.md"], None, "train") == ["one.json"]  # every data file: train
    with pytest.raises(ConfigError, match="has no split 'test'"):
        hub.split_files("r", ["one.json"], None, "test")
    assert hub.missing_shards(["d/train-00000-of-00003-a.parquet", "d/train-00002-of-00003-c.parquet"]) == [
        "d/train-00001-of-00003*"
    ]


def test_a_missing_file_or_repository_is_one_line_that_says_how_to_fetch_it(offline, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "hub"
    shutil.copytree(offline / "hub", copy, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(copy))
    snap = next((copy / "datasets--HuggingFaceH4--ultrachat_200k" / "snapshots").iterdir())
    fake_hub.remove(snap, "data/train_sft-00001-of-00003-0a1804bcb6ae68c6.parquet")
    fake_hub.remove(snap, "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet")
    for split, what in (("train_sft", "lacks data/train_sft-00001-of-00003*"), ("test_sft", "no file of split")):
        with pytest.raises(ConfigError) as e:
            hub.resolve("HuggingFaceH4/ultrachat_200k", split)
        assert what in str(e.value) and "python -m fff_lightning download --config" in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="nobody/nothing is not in the hub cache"):
        hub.resolve("nobody/nothing", "train")


def _overlay(tmp_path: Path) -> Path:
    """Step 2 on the tiny model under a hub id, on CPU, with the research's hub datasets at fewer rows."""
    rows = {"train_rows": 20, "val_rows": 6}
    overlay = {
        "model": {
            "base": {"backend": "hf", "name_or_path": TINY_REPO, "load_in_4bit": False, "dtype": "float32"},
            "fff": {"layers": "1-2", "width": 16, "n_sublayers": 2},
            "optimizer": "adamw",
        },
        "data": {
            "sources": [
                {"name": "metamath", "path": "meta-math/MetaMathQA", "schema": "metamath", **rows},
                {"name": "magicoder", "path": "ise-uiuc/Magicoder-OSS-Instruct-75K", "schema": "magicoder", **rows},
                {"name": "ultrachat", "path": "HuggingFaceH4/ultrachat_200k", "schema": "ultrachat", **rows,
                 "train_split": "train_sft", "val_split": "test_sft", "val_take": "head"},
                {"name": "artificial_thinker", "path": "freecs/ArtificialThinkerSet", "schema": "artificial_thinker",
                 "repeat": 2, "val_take": "head", **rows},
            ],
            "num_proc": None,
            "max_seq_length": 256,
        },
        "trainer": {"accelerator": "cpu", "precision": "32-true", "max_steps": 3, "val_check_interval": 3,
                    # the budget guard compares with step2_lora on 7B proportions; the tiny model has others
                    "callbacks": [{"class_path": "fff_lightning.callbacks.DeterministicSeed"}]},
    }  # fmt: skip
    path = tmp_path / "offline.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


@pytest.mark.slow
def test_step2_trains_offline_from_the_hub_cache_and_a_missing_shard_is_one_line(offline, tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline / "hub"), "FFF_CACHE": str(tmp_path / "fff")}
    env.pop("HF_DATASETS_OFFLINE", None)
    cmd = [sys.executable, "-m", "fff_lightning", "fit", "--config", "step2", "--config", str(_overlay(tmp_path))]
    cmd += ["--logs_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar", "false"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "validation after training" in out.stdout
    for name in ("metamath", "magicoder", "ultrachat", "artificial_thinker"):
        assert name in out.stdout
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.name not in (".", ".."))

    snap = next((offline / "hub" / "datasets--HuggingFaceH4--ultrachat_200k" / "snapshots").iterdir())
    link = snap / "data" / "train_sft-00002-of-00003-ee46ed25cfae92c6.parquet"
    target = os.readlink(link)
    link.unlink()
    try:
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    finally:
        link.symlink_to(target)
    assert again.returncode == 2, again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "HuggingFaceH4/ultrachat_200k split 'train_sft' lacks" in errors[0], errors
    assert "Traceback" not in again.stderr


class FakeHub:
    """The hub's listing of the cached repositories (their files and sizes), plus files not downloaded yet."""

    extra = {
        "HuggingFaceH4/ultrachat_200k": ["data/train_gen-00000-of-00001-x.parquet"],
        TINY_REPO: ["pytorch_model.bin"],
    }

    def __init__(self, cache: Path):
        self.cache = cache

    def _info(self, repo: str, kind: str):
        from types import SimpleNamespace

        root = self.cache / f"{kind}s--{repo.replace('/', '--')}"
        sha = (root / "refs" / "main").read_text()
        snap = root / "snapshots" / sha
        files = [(str(p.relative_to(snap)), p.stat().st_size) for p in snap.rglob("*") if p.is_file()]
        files += [(f, 1000) for f in self.extra.get(repo, [])]
        return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=f, size=n) for f, n in files])

    def dataset_info(self, repo, files_metadata=False, **kw):
        return self._info(repo, "dataset")

    def model_info(self, repo, files_metadata=False, **kw):
        return self._info(repo, "model")


def test_download_lists_what_a_run_needs_and_fetches_only_what_is_missing(cache, tmp_path, monkeypatch, capsys):
    import shutil

    import huggingface_hub

    from fff_lightning.download import main

    copy = tmp_path / "hub"
    shutil.copytree(cache / "hub", copy, symlinks=True)
    snap = next((copy / "datasets--HuggingFaceH4--ultrachat_200k" / "snapshots").iterdir())
    fake_hub.remove(snap, "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(copy))
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: FakeHub(cache / "hub"))  # the hub still has it
    args = ["--config", "step2", "--config", str(_overlay(tmp_path))]
    main([*args, "--dry-run"])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "to download" in lines["HuggingFaceH4/ultrachat_200k/data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet"]
    assert "cached" in lines["meta-math/MetaMathQA/MetaMathQA-395K.json"]
    assert f"{TINY_REPO}/model.safetensors" in lines and f"{TINY_REPO}/pytorch_model.bin" not in lines
    assert not any("train_gen" in k for k in lines)  # a split the run does not read
    assert "1 to download" in out

    fetched, real = [], huggingface_hub.hf_hub_download

    def fetch(repo, path, **kw):  # the cards are read from the cache; a data file would come from the network
        return real(repo, path, **kw) if path == "README.md" else fetched.append((repo, path))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    main(args)
    assert fetched == [("HuggingFaceH4/ultrachat_200k", "data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet")]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        main(args)
    # offline, --dry-run checks the cache alone: the shard removed above is named
    capsys.readouterr()
    with pytest.raises(ConfigError, match="1 of the repositories and splits an offline run needs is not"):
        main([*args, "--dry-run"])
    out = capsys.readouterr().out
    assert "missing: HuggingFaceH4/ultrachat_200k: no file of split 'test_sft'" in out
    assert f"{TINY_REPO}: cached" in out and "meta-math/MetaMathQA split train: cached (1 files)" in out


def test_a_partial_download_and_a_snapshot_without_refs_main_are_still_read(offline, tmp_path, monkeypatch):
    """`hf download --include` records the repository's whole file list (huggingface_hub then calls the snapshot
    incomplete), and a download by commit writes no refs/main: the files a run reads are what counts."""
    import json as js
    import shutil

    copy = tmp_path / "hub"
    shutil.copytree(offline / "hub", copy, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(copy))
    root = copy / "datasets--HuggingFaceH4--ultrachat_200k"
    sha = (root / "refs" / "main").read_text()
    (root / "trees").mkdir()
    (root / "trees" / f"{sha}.json").write_text(js.dumps([{"path": "data/train_gen-00000-of-00001-x.parquet"}]))
    assert len(hub.resolve("HuggingFaceH4/ultrachat_200k", "train_sft").files) == 3
    (root / "refs" / "main").unlink()
    hub._RESOLVED.clear()
    assert len(hub.resolve("HuggingFaceH4/ultrachat_200k", "test_sft").files) == 1
