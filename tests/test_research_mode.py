"""Research mode reproduces the FFF study's text and token ids exactly, on rows of all four schemas.

The reference below restates the study's formatting rules (train_mistral/trainer.py and tester.py of
ostix360/ai-research) independently: a question and answer is ``"###USER: {q}\\n###ASSISTANT: {a}"``; an
ArtificialThinkerSet answer is ``"{reasoning} {response}"``; an UltraChat conversation gives one text per assistant
turn, every turn written as ``"###USER: {u}\\n"`` or ``"###ASSISTANT: {a}\\n"``, system turns ignored; the text
is tokenized by the model's SentencePiece tokenizer with BOS and no EOS.
"""

import json

import pytest

from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.data.sources import SourceConfig
from fff_lightning.tokenizer import load_tokenizer, sentencepiece_model


def reference_pair(question: str, answer: str) -> str:
    return "###USER: " + question + "\n###ASSISTANT: " + answer


def reference_thinker(row: dict) -> str:
    return reference_pair(row["prompt"], row["reasoning"] + " " + row["response"])


def reference_ultrachat(row: dict) -> list[str]:
    texts, context = [], ""
    for message in row["messages"]:
        if message["role"] == "user":
            context = context + "###USER: " + message["content"] + "\n"
        elif message["role"] == "assistant":
            context = context + "###ASSISTANT: " + message["content"] + "\n"
            texts.append(context)
    return texts


SPACES = "def f(x):\n    if x:\n        return  x  *  2\n\treturn None   \n"
UNICODE = "Ünïcödé — 中文, emoji 🙂, Ελληνικά, e\u0301 (combining), non\u00a0breaking"
ROWS = {
    "magicoder": [
        {"problem": "Write f.\n\n  Indented  spec:", "solution": SPACES, "lang": "python", "seed": "", "index": 0},
        {"problem": UNICODE, "solution": '```rust\nfn main() {\n    println!("hi");\n}\n```', "lang": "rust"},
    ],
    "metamath": [
        {"query": "What is  2 + 2?", "response": "It is 4.\n\nThe answer is: 4", "type": "GSM_Rephrased"},
        {"query": "  leading and trailing  ", "response": UNICODE, "type": "MATH_SV"},
    ],
    "artificial_thinker": [
        {"prompt": "Why?", "reasoning": "", "response": "Because."},  # empty reasoning: "Because." after a space
        {"prompt": UNICODE, "reasoning": "First,  think.\n  Then:", "response": SPACES},
    ],
    "ultrachat": [
        {
            "prompt": "p",
            "prompt_id": "1",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Q1  with  spaces"},
                {"role": "assistant", "content": "A1\n    indented"},
                {"role": "user", "content": UNICODE},
                {"role": "assistant", "content": SPACES},
                {"role": "user", "content": "Q3"},
                {"role": "assistant", "content": ""},
            ],
        },
    ],
}


def reference_texts(schema: str) -> list[str]:
    rows = ROWS[schema]
    if schema == "magicoder":
        return [reference_pair(r["problem"], r["solution"]) for r in rows]
    if schema == "metamath":
        return [reference_pair(r["query"], r["response"]) for r in rows]
    if schema == "artificial_thinker":
        return [reference_thinker(r) for r in rows]
    return [t for r in rows for t in reference_ultrachat(r)]


@pytest.mark.parametrize("schema", list(ROWS))
def test_research_mode_gives_the_studys_text_and_token_ids(schema, tmp_path):
    f = tmp_path / f"{schema}.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS[schema]))
    dm = FFFDataModule(
        [SourceConfig(schema, str(f), schema, val_split=None)],
        text_style="research",
        eos=False,
        system_turns="drop",
        max_seq_length=4096,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    tok = load_tokenizer(None)
    sp = sentencepiece_model(tok)
    ours = [r["input_ids"] for r in dm.prepared[0].train]
    expected = reference_texts(schema)
    assert len(ours) == len(expected)
    for ids, text in zip(ours, expected, strict=True):
        assert ids == [sp.bos_id(), *sp.encode(text)]  # SentencePiece's ids, BOS first, no EOS
        assert sp.decode(ids[1:]) == text  # the bytes


def test_sentencepiece_ids_differ_from_the_rebuilt_fast_tokenizer_on_runs_of_spaces():
    tok = load_tokenizer(None)
    sp = sentencepiece_model(tok)
    from fff_lightning.tokenizer import encode

    assert encode(tok, "a  b")[0] == [1, *sp.encode("a  b")] == [1, 264, 28705, 287]
    assert tok("a  b")["input_ids"] != encode(tok, "a  b")[0]  # why research mode does not use it


def test_research_shuffle_is_what_datasets_does_to_the_concatenation():
    from datasets import Dataset, concatenate_datasets

    from fff_lightning.data.sampling import mix_order

    a = Dataset.from_dict({"k": [(0, r) for r in range(40)]})
    b = Dataset.from_dict({"k": [(1, r) for r in range(7)]})
    research = concatenate_datasets([a, b, b, b]).shuffle(seed=12)  # as the study built its mix
    assert mix_order([40, 7], [1, 3], seed=12, shuffle="datasets") == [tuple(k) for k in research["k"]]


def _tiny_module(**kw):
    from fff_lightning.module import FFFModule
    from fff_lightning.spec import BaseModelConfig, FFFConfig, LoRAConfig

    base = BaseModelConfig(backend="tiny", load_in_4bit=False, dtype="float32", gradient_checkpointing=False)
    return FFFModule(base, FFFConfig(n_sublayers=1, width=8, layers="1-2"), LoRAConfig(r=4), seed=3, **kw)


def _trainer(**kw):
    import lightning as L

    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kw)


def test_batches_reduction_is_hugging_faces_eval_loss(tmp_path):
    import torch

    src = [SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=8, val_rows=12)]
    dm = FFFDataModule(src, max_seq_length=128, val_batch_size=5, cache_dir=str(tmp_path / "c"))
    module = _tiny_module(val_reduction="batches")
    _trainer().validate(module, dm, verbose=False)
    ours = module.last_results[0]
    # Hugging Face's evaluation loop: each batch's mean loss, repeated per sample, averaged over samples.
    losses = []
    with torch.no_grad():
        for batch in dm.val_dataloader()[0]:
            losses += [float(module(batch).loss)] * batch["input_ids"].shape[0]
    assert ours["reduction"] == "batches" and ours["rows"] == 12
    assert ours["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    module_t = _tiny_module()
    _trainer().validate(module_t, dm, verbose=False)
    assert module_t.last_results[0]["reduction"] == "tokens" and module_t.last_results[0]["loss"] != ours["loss"]


def test_warmup_from_zero_starts_at_lr_0_and_drop_last_drops_the_partial_batch(tmp_path):
    src = [SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=10, val_split=None)]
    dm = FFFDataModule(src, max_seq_length=128, batch_size=3, drop_last=True, cache_dir=str(tmp_path / "c"))
    module = _tiny_module(lr=1e-3, warmup_steps=2, warmup_from_zero=True)
    lrs = []

    class Record(__import__("lightning").Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(max_epochs=1, callbacks=[Record()]).fit(module, dm)
    assert len(lrs) == 3  # 10 samples, batches of 3: the partial fourth batch is not trained on
    assert lrs[:2] == [0.0, pytest.approx(5e-4)]  # Hugging Face's warm-up: 0, then lr * 1/2
