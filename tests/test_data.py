"""The data module on the bundled samples and on files the tests write."""

import json
from pathlib import Path

import pytest
import torch

from fff_lightning.data import make_samples
from fff_lightning.data.datamodule import FFFDataModule
from fff_lightning.data.formatting import render_research, tokenize_sample
from fff_lightning.data.sources import BUNDLED, SourceConfig
from fff_lightning.errors import ConfigError
from fff_lightning.tokenizer import load_tokenizer, sentencepiece_model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def bundled(**over):
    srcs = {
        "magicoder": SourceConfig("magicoder", "bundled:magicoder", "magicoder", train_rows=25, val_rows=8),
        "metamath": SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=0.5, val_rows=5),
        "ultrachat": SourceConfig("ultrachat", "bundled:ultrachat", "ultrachat", train_rows=12, val_rows=6),
        "artificial_thinker": SourceConfig(
            "artificial_thinker", "bundled:artificial_thinker", "artificial_thinker", repeat=6, val_take="head"
        ),
    }
    srcs.update(over)
    return list(srcs.values())


def dm(tmp_path, sources=None, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("max_seq_length", 256)
    kw.setdefault("batch_size", 4)
    return FFFDataModule(sources if sources is not None else bundled(), **kw)


def batches(module, loader="train"):
    module.setup("fit")
    dl = module.train_dataloader() if loader == "train" else module.val_dataloader()[0]
    return [b for b in dl]


def rows_of(name):
    return [json.loads(line) for line in (BUNDLED / f"{name}.jsonl").read_text().splitlines()]


def assistant_turns(rows):
    return sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in rows)


def test_exact_counts_after_take_and_repeat(tmp_path):
    m = dm(tmp_path)
    m.setup("fit")
    s = {r["dataset"]: r for r in m.summary}
    assert (s["magicoder"]["train_rows"], s["magicoder"]["train_samples"], s["magicoder"]["val_samples"]) == (25, 25, 8)
    assert (s["metamath"]["train_rows"], s["metamath"]["val_rows"]) == (20, 5)  # 0.5 of 40 rows
    uc = rows_of("ultrachat")
    assert s["ultrachat"]["train_samples"] == assistant_turns(uc[:12])  # head
    assert s["ultrachat"]["val_samples"] == assistant_turns(uc[-6:])  # tail
    assert (s["artificial_thinker"]["train_rows"], s["artificial_thinker"]["train_samples"]) == (40, 240)
    assert len(m.train_set) == 25 + 20 + assistant_turns(uc[:12]) + 240
    counts = torch.bincount(torch.tensor([src for src, _ in m.train_set.order]), minlength=4).tolist()
    assert counts == [25, 20, assistant_turns(uc[:12]), 240]


def test_validation_is_per_dataset_and_flags_rows_seen_in_training(tmp_path):
    m = dm(tmp_path)
    m.setup("fit")
    assert m.val_names == ["magicoder", "metamath", "ultrachat", "artificial_thinker"]
    assert len(m.val_dataloader()) == 4
    seen = {r["dataset"]: r["seen_in_training"] for r in m.summary}
    assert seen == {"magicoder": False, "metamath": False, "ultrachat": False, "artificial_thinker": True}


def test_overlap_of_head_and_tail_is_flagged(tmp_path):
    src = SourceConfig("metamath", "bundled:metamath", "metamath", train_rows=30, val_rows=15)  # 30 head, 15 tail
    m = dm(tmp_path, [src])
    m.setup("fit")
    assert m.summary[0]["seen_in_training"] is True


def test_same_seed_same_batches_whatever_the_workers(tmp_path):
    a = batches(dm(tmp_path, num_workers=0, group_by_length=True))
    b = batches(dm(tmp_path, num_workers=2, group_by_length=True))
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)


def test_parallel_tokenization_gives_the_same_rows(tmp_path):
    src = [SourceConfig("at", "bundled:artificial_thinker", "artificial_thinker", val_rows=8)]
    one, two = dm(tmp_path, src, cache=False), dm(tmp_path, src, cache=False, num_proc=2)
    for m in (one, two):
        m.setup("fit")
    assert [r["input_ids"] for r in one.prepared[0].train] == [r["input_ids"] for r in two.prepared[0].train]


def test_another_seed_changes_selection_and_order(tmp_path):
    srcs = bundled(
        metamath=SourceConfig(
            "metamath", "bundled:metamath", "metamath", train_rows=0.5, train_take="random", val_rows=5
        )
    )
    a, b, c = (dm(tmp_path, srcs, seed=s) for s in (12, 12, 13))
    for m in (a, b, c):
        m.setup("fit")
    assert a.train_set.order == b.train_set.order != c.train_set.order
    picked = [[m.tokenizer.decode(r["input_ids"][:30]) for r in m.prepared[1].train] for m in (a, c)]
    assert picked[0] != picked[1]


def test_k_turn_dialogue_gives_k_samples_and_system_rule(tmp_path, tok):
    row = {
        "prompt": "hi",
        "prompt_id": "x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
            {"role": "user", "content": "Q3"},
            {"role": "assistant", "content": "A3"},
        ],
    }
    f = tmp_path / "uc.jsonl"
    f.write_text(json.dumps(row) + "\n")
    m = dm(tmp_path, [SourceConfig("uc", str(f), "ultrachat", val_split=None)])
    m.setup("fit")
    texts = [tok.decode(r["input_ids"], skip_special_tokens=True) for r in m.prepared[0].train]
    assert len(texts) == 3
    # Every turn of a dialogue on its own line, the last one too: the research's text.
    assert texts[0] == "###USER: Be brief.\n\nQ1\n###ASSISTANT: A1\n"
    assert texts[2] == (
        "###USER: Be brief.\n\nQ1\n###ASSISTANT: A1\n###USER: Q2\n###ASSISTANT: A2\n###USER: Q3\n###ASSISTANT: A3\n"
    )
    assert m.val_names == []
    dropped = dm(tmp_path, [SourceConfig("uc", str(f), "ultrachat", val_split=None)], system_turns="drop")
    dropped.setup("fit")
    assert (
        tok.decode(dropped.prepared[0].train[0]["input_ids"], skip_special_tokens=True)
        == "###USER: Q1\n###ASSISTANT: A1\n"
    )


def test_research_template_byte_for_byte(tok):
    row = rows_of("magicoder")[0]
    text, spans = render_research([("user", row["problem"]), ("assistant", row["solution"])])
    assert text == "###USER: " + row["problem"] + "\n###ASSISTANT: " + row["solution"]
    assert text[spans[0][0] : spans[0][1]] == row["solution"]
    t = tokenize_sample([("user", row["problem"]), ("assistant", row["solution"])], tok, "research", "all", 4096)
    sp = sentencepiece_model(tok)  # the code sample has indented lines: SentencePiece's ids, not transformers'
    assert t["input_ids"] == [tok.bos_token_id, *sp.encode(text), tok.eos_token_id]
    assert t["labels"] == t["input_ids"]


def test_artificial_thinker_answer_is_reasoning_space_response(tok):
    row = rows_of("artificial_thinker")[0]
    m_text = render_research([("user", row["prompt"]), ("assistant", f"{row['reasoning']} {row['response']}")])[0]
    t = tokenize_sample(
        [("user", row["prompt"]), ("assistant", f"{row['reasoning']} {row['response']}")], tok, "research", "all", 999
    )
    assert tok.decode(t["input_ids"], skip_special_tokens=True) == m_text


def test_assistant_only_loss_masks_the_prompt(tok):
    sample = [("user", "What is 2 + 2?"), ("assistant", "It is 4."), ("user", "And 3 + 3?"), ("assistant", "Six.")]
    t = tokenize_sample(sample, tok, "research", "assistant", 4096)
    learned = [i for i, lab in zip(t["input_ids"], t["labels"], strict=True) if lab != -100]
    masked = [i for i, lab in zip(t["input_ids"], t["labels"], strict=True) if lab == -100]
    assert tok.decode(learned, skip_special_tokens=True).split() == ["It", "is", "4.", "Six."]
    assert learned[-1] == tok.eos_token_id
    assert "What is 2 + 2?" in tok.decode(masked) and "###ASSISTANT:" in tok.decode(masked)
    assert all(lab in (-100, i) for i, lab in zip(t["input_ids"], t["labels"], strict=True))


def test_chat_template_style(tmp_path, tok):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    t = tokenize_sample([("user", "Hi?"), ("assistant", "Hello!")], tok, "chat_template", "assistant", 99, template)
    learned = [i for i, lab in zip(t["input_ids"], t["labels"], strict=True) if lab != -100]
    assert tok.decode(learned, skip_special_tokens=True) == "Hello!"
    # the template's own </s> closes the answer: scored (the model learns to stop), and no second EOS after it
    assert learned[-1] == tok.eos_token_id and t["input_ids"].count(tok.eos_token_id) == 1
    assert t["input_ids"][0] == tok.bos_token_id and t["input_ids"].count(tok.bos_token_id) == 1  # the tokenizer's
    with pytest.raises(ConfigError, match="data.chat_template: the tokenizer has no chat template"):
        dm(tmp_path, text_style="chat_template").setup("fit")


def test_truncation_is_counted(tmp_path):
    m = dm(tmp_path, max_seq_length=40)
    m.setup("fit")
    s = {r["dataset"]: r for r in m.summary}
    assert s["magicoder"]["truncated"] > 0
    assert max(len(r["input_ids"]) for p in m.prepared for r in p.train) == 40
    n_long = sum(r["truncated"] for r in m.prepared[0].train) + sum(r["truncated"] for r in m.prepared[0].val)
    assert s["magicoder"]["truncated"] == n_long


def test_padding_is_masked_in_batches(tmp_path):
    b = batches(dm(tmp_path))[0]
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()


def test_group_by_length_cuts_padding(tmp_path):
    plain = dm(tmp_path)
    grouped = dm(tmp_path, group_by_length=True)
    for m in (plain, grouped):
        m.setup("fit")

    def share(m):
        return sum(r["padding_share"] * r["train_tokens"] for r in m.summary) / sum(
            r["train_tokens"] for r in m.summary
        )

    assert share(grouped) < share(plain)
    assert sorted(grouped.train_set.order) == sorted(plain.train_set.order)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    import fff_lightning.data.prepare as prepare

    f = tmp_path / "mm.jsonl"
    f.write_text((BUNDLED / "metamath.jsonl").read_text())
    src = [SourceConfig("metamath", str(f), "metamath", train_rows=10, val_rows=5)]
    first = dm(tmp_path, src)
    first.setup("fit")
    assert first.summary[0]["cached"] is False
    calls = []
    real = prepare._tokenize
    monkeypatch.setattr(prepare, "_tokenize", lambda *a, **k: calls.append(1) or real(*a, **k))
    prepare.BUILT.clear()  # as in a new process: the entry was built by an earlier run
    again = dm(tmp_path, src)
    again.setup("fit")
    assert again.summary[0]["cached"] is True and calls == []
    assert [r["input_ids"] for r in again.prepared[0].train] == [r["input_ids"] for r in first.prepared[0].train]
    dm(tmp_path, src, max_seq_length=64).setup("fit")  # another max_seq_length: rebuilt
    assert len(calls) == 2
    f.write_text(f.read_text().replace("Tom", "Ann"))  # the file changed: rebuilt
    changed = dm(tmp_path, src)
    changed.setup("fit")
    assert changed.summary[0]["cached"] is False and len(calls) == 4


def test_a_fifth_dataset_with_plain_columns_and_path_override(tmp_path):
    f = tmp_path / "qa.parquet"
    import datasets

    datasets.Dataset.from_dict({"q": [f"q{i}?" for i in range(6)], "a": [f"a{i}" for i in range(6)]}).to_parquet(str(f))
    extra = SourceConfig("qa", "nowhere.jsonl", "prompt_response", prompt_column="q", response_column="a", val_rows=2)
    m = dm(tmp_path, [*bundled(), extra], paths={"qa": str(f)})
    m.setup("fit")
    assert m.val_names[-1] == "qa" and m.summary[-1]["train_samples"] == 6
    assert (
        m.tokenizer.decode(m.prepared[-1].train[0]["input_ids"], skip_special_tokens=True)
        == "###USER: q0?\n###ASSISTANT: a0"
    )


def test_bundled_samples_are_the_generators_output():
    for name in make_samples.MAKERS:
        assert (BUNDLED / f"{name}.jsonl").read_text() == make_samples.render(name)
        assert len(rows_of(name)) == make_samples.N_ROWS


def write(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda t: SourceConfig("x", str(t / "absent.jsonl"), "metamath"),
            "data.sources.x.path: no such file or folder",
        ),
        (lambda t: SourceConfig("x", "bundled:metamath", "gsm8k"), "data.sources.x.schema: unknown value 'gsm8k'"),
        (
            lambda t: SourceConfig("x", "bundled:metamath", "metamath", repeat=0),
            "data.sources.x.repeat: must be an int from 1 to 1000",
        ),
        (
            lambda t: SourceConfig("x", "bundled:metamath", "metamath", train_rows=-3),
            "data.sources.x.train_rows: must be a positive",
        ),
        (
            lambda t: SourceConfig("x", "bundled:metamath", "metamath", val_rows=1.5),
            "data.sources.x.val_rows: must be a positive",
        ),
        (
            lambda t: SourceConfig("x", "bundled:magicoder", "metamath"),
            "data.sources.x: schema 'metamath' needs column(s) ['query', 'response'], which bundled:magicoder lacks; it has",
        ),
        (
            lambda t: SourceConfig("x", "bundled:metamath", "metamath", train_rows=0.001),
            "data.sources.x.train_rows: selects no training row",
        ),
        (
            lambda t: SourceConfig("x", "bundled:metamath", "metamath", train_rows=41),
            "asks for 41 rows but the split has 40",
        ),
        (
            lambda t: SourceConfig(
                "x", write(t, "bad.jsonl", '{"query": "a", "response": "b"}\n{"query": "c",\n'), "metamath"
            ),
            "bad.jsonl, line 2: malformed JSON",
        ),
        (
            lambda t: SourceConfig(
                "x",
                write(t, "num.jsonl", '{"query": "a", "response": "b"}\n{"query": 7, "response": "c"}\n'),
                "metamath",
                val_split=None,
            ),
            "num.jsonl, line 2: column 'query' holds int, not text",  # named by file and line
        ),
        (lambda t: SourceConfig("x", "bundled:nothing", "metamath"), "no bundled data 'bundled:nothing'"),
        (lambda t: SourceConfig("x", "bundled:real/../real/math", "metamath"), "no bundled data"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(tmp_path, make, message):
    with pytest.raises(ConfigError) as e:
        dm(tmp_path, [make(tmp_path)]).setup("fit")
    assert message in str(e.value)


def test_failed_preparation_leaves_no_half_written_cache(tmp_path):
    text = "".join(
        json.dumps({"query": f"q{i}", "response": "r" if i < 9 else ["not", "text"]}) + "\n" for i in range(10)
    )
    f = write(tmp_path, "late_error.jsonl", text)
    with pytest.raises(ConfigError, match="late_error.jsonl, line 10: column 'response' holds list"):  # rows 1-8 fine
        dm(tmp_path, [SourceConfig("x", f, "metamath", train_rows=8, val_rows=2)]).setup("fit")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_bad_module_arguments(tmp_path):
    for kw, field in [
        (dict(text_style="alpaca"), "data.text_style"),
        (dict(loss_on="prompt"), "data.loss_on"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(paths={"gsm8k": "x.jsonl"}), "data.paths.gsm8k"),
    ]:
        with pytest.raises(ConfigError) as e:
            dm(tmp_path, **kw)
        assert e.value.field == field
    with pytest.raises(ConfigError, match="every dataset is disabled"):
        dm(tmp_path, [SourceConfig("x", "bundled:metamath", "metamath", enabled=False)])


def test_research_defaults_point_at_the_hub_with_the_research_slices():
    m = FFFDataModule()
    by = {s.name: s for s in m.sources}
    assert by["metamath"].path == "meta-math/MetaMathQA" and by["metamath"].train_rows == 10000
    assert (by["metamath"].val_split, by["metamath"].val_rows, by["metamath"].val_take) == ("train", 1000, "tail")
    assert (by["ultrachat"].train_split, by["ultrachat"].val_split, by["ultrachat"].val_rows) == (
        "train_sft",
        "test_sft",
        2000,
    )
    assert by["artificial_thinker"].repeat == 6 and m.seed == 12
    assert Path(BUNDLED).is_dir()


#: The message-rendering part of Qwen3's chat template (its tokenizer's; the qwen3 configs use it): an answer after
#: the last question gets an empty think block and loses its leading newlines.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- if loop.last %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n\\n</think>\\n\\n' + message.content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
)
#: SmolLM2-Instruct's template, as its GGUF file holds it (the quickstart and real_* configs use it): ChatML with a
#: default system prompt; messages verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("fmt", ["llama3", "qwen3", "chatml"])
def test_every_shipped_chat_format_trains_on_messages_edged_with_whitespace(tok, fmt):
    """Real data is full of messages that begin or end with spaces or newlines; Llama 3's template trims them,
    Qwen3's strips an answer's leading newlines. The answer spans are what the template renders."""
    from fff_lightning.data.formatting import render_chat
    from fff_lightning.run_config import describe_run

    template = {
        "llama3": describe_run("llama3_step2").datamodule.opts.chat_template,
        "qwen3": QWEN3_TEMPLATE,
        "chatml": CHATML_TEMPLATE,
    }[fmt]
    sample = [
        ("user", "  Hi there\n"),
        ("assistant", "\n\nHello!  \n"),
        ("user", " a second q "),
        ("assistant", "\nok\n"),
    ]
    text, spans = render_chat(sample, tok, template)
    answers = [text[a:b] for a, b in spans]
    expected = {
        "llama3": ["Hello!", "ok"],
        "qwen3": ["\n\nHello!  \n", "ok\n"],
        "chatml": ["\n\nHello!  \n", "\nok\n"],
    }[fmt]
    assert answers == expected
    t = tokenize_sample(sample, tok, "chat_template", "assistant", 512, template)
    learned = [i for i, lab in zip(t["input_ids"], t["labels"], strict=True) if lab != -100]
    assert "Hello!" in tok.decode(learned) and "ok" in tok.decode(learned) and "Hi there" not in tok.decode(learned)


def test_a_template_that_rewrites_messages_is_one_line_naming_the_row(tmp_path):
    rows = [{"query": "2 + 2?", "response": "4"}, {"query": "3 + 3?", "response": "six"}]
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    upper = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    m = dm(tmp_path, [SourceConfig("m", str(f), "metamath")], text_style="chat_template", chat_template=upper)
    with pytest.raises(ConfigError, match=r"data.sources.m: .*line 2.*changes a assistant message's text"):
        m.setup("fit")
