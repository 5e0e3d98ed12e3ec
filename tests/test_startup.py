"""Start-up with everything cached: the data module's prepare + setup at scale reads no raw data and tokenizes
nothing (how long it takes is a benchmark's question: docs/scale.md measures the research's full size, 88,801
samples)."""

import pytest
import scale
import yaml

from fff_lightning.data import prepare
from fff_lightning.run_config import describe_run


def _datamodule(paths: dict, tmp_path, packing: bool):
    sources = [
        {"name": "metamath", "path": paths["metamath"], "schema": "metamath", "val_rows": 100},
        {"name": "magicoder", "path": paths["magicoder"], "schema": "magicoder", "val_rows": 100},
        {"name": "ultrachat", "path": paths["ultrachat"], "schema": "ultrachat", "train_split": "train_sft",
         "val_split": "test_sft", "val_rows": None},
        {"name": "artificial_thinker", "path": paths["artificial_thinker"], "schema": "artificial_thinker",
         "repeat": 6, "val_take": "head", "val_rows": None},
    ]  # fmt: skip
    for s in sources:  # every row (the quickstart's row counts would otherwise carry over, item by item)
        s["train_rows"] = None
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"sources": sources, "cache_dir": str(tmp_path / "cache")}}))
    extra = ["--data.packing", "true"] if packing else []
    return describe_run("tiny", overlay, overrides=["--data.num_proc", "2", *extra]).datamodule


@pytest.mark.slow
def test_a_cached_start_of_20000_samples_reads_no_raw_data_and_tokenizes_nothing(tmp_path, monkeypatch):
    written = yaml.safe_load(scale.write(tmp_path / "mix", fraction=0.25, words=0.05).read_text())
    paths = written["data"]["paths"]
    first = _datamodule(paths, tmp_path, packing=False)
    first.prepare_data()
    first.setup("fit")  # tokenizes and caches
    assert len(first.train_set) > 20_000
    prepare.BUILT.clear()  # as a new process: the entries are read back as cache hits

    def never(*args, **kwargs):
        raise AssertionError("a cached start read raw data or tokenized")

    monkeypatch.setattr(prepare, "_load_split", never)
    monkeypatch.setattr(prepare, "_tokenize", never)
    for packing in (False, True):
        dm = _datamodule(paths, tmp_path, packing)
        dm.prepare_data()
        dm.setup("fit")
        assert all(r["cached"] for r in dm.summary)
        if not packing:  # the same data and plan as the run that built the cache
            assert dm.train_batches == first.train_batches and dm.summary[0]["train_tokens"] > 0


def test_a_cache_entry_that_lost_its_validation_part_is_rebuilt(tmp_path, caplog):
    import shutil

    from helpers import QUICK

    def setup():
        dm = describe_run(QUICK, overrides=["--data.cache_dir", str(tmp_path)]).datamodule
        dm.setup("fit")
        return dm

    setup()
    entry = next(p for p in tmp_path.iterdir() if p.name.startswith("metamath-"))
    shutil.rmtree(entry / "val")
    prepare.BUILT.clear()
    dm = setup()
    assert "is damaged" in caplog.text and (entry / "val").is_dir()
    assert next(r for r in dm.summary if r["dataset"] == "metamath")["val_samples"] == 8


def test_a_folder_with_a_file_for_one_split_and_not_the_other_is_refused(tmp_path):
    from fff_lightning.data.prepare import TextOptions, prepare_source
    from fff_lightning.data.sources import SourceConfig
    from fff_lightning.errors import ConfigError

    for split in ("train_sft", "test_sft"):
        (tmp_path / f"{split}.jsonl").write_text('{"prompt": "a", "prompt_id": "0", "messages": []}\n')
    src = SourceConfig("ultrachat", str(tmp_path), "ultrachat", train_split="train", val_split="test_sft")
    with pytest.raises(ConfigError, match="holds a file for split 'test_sft' but none named 'train'"):
        prepare_source(src, None, TextOptions("research", "all", 64, None), 0, None, None)


def test_a_tokenizers_fingerprint_is_taken_once_and_again_when_its_vocabulary_grows(monkeypatch):
    from fff_lightning.tokenizer import load_tokenizer

    tok = load_tokenizer(None)  # the offline Mistral tokenizer
    taken = []
    real = prepare._fingerprint
    monkeypatch.setattr(prepare, "_fingerprint", lambda t: taken.append(1) or real(t))
    first = prepare.tokenizer_fingerprint(tok)
    assert prepare.tokenizer_fingerprint(tok) == first and len(taken) == 1  # every source of a run asks
    tok.add_tokens(["<fff_probe_token>"])
    assert prepare.tokenizer_fingerprint(tok) != first and len(taken) == 2
