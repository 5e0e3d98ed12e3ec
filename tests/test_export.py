"""``export``, ``generate`` and ``chat``: a run as a folder other tools load, and text people can use."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quick_args, refused

from fff_lightning.cli import main
from fff_lightning.generation import Sampling, StopAwareStreamer, cut

ROOT = Path(__file__).parent.parent


def fails(capsys, *argv) -> str:
    """The one line a command that fails prints (no traceback)."""
    return refused(argv, capsys)


def trained(logs: Path, *extra: str, steps: int = 3) -> Path:
    """A tiny run trained a few steps at a high learning rate, so LoRA's B is far from zero and merging matters."""
    from fff_lightning.lightning_cli import run_lightning

    cli = run_lightning(quick_args(logs, "--trainer.limit_val_batches", "0", "--model.lr", "3e-2", *extra, steps=steps))
    return cli.folder.path


def run_logits(run: Path, prompt_ids: list[int]) -> torch.Tensor:
    from fff_lightning.inference import run_model

    model, _, _ = run_model(run)
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt_ids])).logits[0].float()


# A process in which fff_lightning cannot be imported loads the folder and prints its logits.
LOAD_ALONE = """
import json, sys
sys.modules["fff_lightning"] = None  # import fff_lightning now fails
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = json.loads(sys.argv[2])
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor([ids])).logits[0].tolist()))
print(type(model).__name__, file=sys.stderr)
"""


@pytest.mark.slow
def test_a_run_with_fff_exports_loads_without_the_package_with_equal_logits_and_generates(tmp_path, capsys,
                                                                                         trained_run):  # fmt: skip
    """The FFF + LoRA run (LoRA merged; a merge of LoRA trained far from zero is checked by the LoRA-only test)."""
    run = trained_run.run
    out = tmp_path / "export"
    main(["export", str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "LoRA merged, FFF as trust_remote_code modules" in printed and "MiB" in printed
    assert "checked: loaded back" in printed and "model.safetensors" in printed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_fff.py", "tokenizer.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["fff_adapter"]["layers"] == [1, 2] and config["auto_map"]
    assert not [k for k in _keys(out) if "lora" in k]  # LoRA is in the weights, FFF kept as modules
    assert [k for k in _keys(out) if ".fff_blocks." in k]

    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))("Question: what is 12 + 30?\nAnswer:")["input_ids"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", LOAD_ALONE, str(out), json.dumps(ids)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "FFFForCausalLM" in loaded.stderr
    theirs = torch.tensor(json.loads(loaded.stdout))
    ours = run_logits(run, ids)
    assert (theirs - ours).abs().max() < 1e-4 * max(1.0, float(ours.abs().max()))

    # generate: the run (adapters unmerged) and its export (merged) give the same greedy text
    texts = []
    for source in (run, out):
        main(["generate", str(source), "--prompt", "Question: what is 12 + 30?", "--max_new_tokens", "8"])
        got = capsys.readouterr()
        assert "tokens/s]" in got.err
        texts.append(got.out)
    assert texts[0] == texts[1] and texts[0].strip()


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_a_lora_run_exports_a_peft_folder_and_merged_a_plain_one(tmp_path, capsys):
    from peft import PeftModel

    from fff_lightning.inference import describe

    run = trained(tmp_path / "logs", "--model.fff", "null")
    peft_dir, merged = tmp_path / "peft", tmp_path / "merged"
    main(["export", str(run), "--out", str(peft_dir)])
    assert "as a PEFT adapter folder" in capsys.readouterr().out
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()
    ids = [1, 415, 5565, 302, 4843, 349]
    ours = run_logits(run, ids)
    module = describe([str(run / "config.yaml")], []).model
    from fff_lightning import backends
    from fff_lightning.loading import compute_dtype

    base, _ = backends.get(module.loaded_base.backend).load(module.loaded_base, compute_dtype(module.loaded_base))
    peft_model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor([ids])).logits[0]
    assert (theirs - ours).abs().max() < 1e-5

    main(["export", str(run), "--out", str(merged), "--merged"])
    assert "as a model folder (LoRA merged)" in capsys.readouterr().out
    config = json.loads((merged / "config.json").read_text())
    assert "auto_map" not in config and not (merged / "modeling_fff.py").exists()
    assert not [k for k in _keys(merged) if "lora" in k]
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()  # no remote code
    with torch.no_grad():
        assert (plain(input_ids=torch.tensor([ids])).logits[0] - ours).abs().max() < 1e-4
    # generate reads a PEFT folder too
    main(["generate", str(peft_dir), "--prompt", "Hello", "--max_new_tokens", "4"])
    assert "PEFT adapters" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_exports_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    out = tmp_path / "out"
    assert "is not a run folder" in fails(capsys, "export", str(tmp_path), "--out", str(out))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare)
    assert "has no trained adapters" in fails(capsys, "export", str(bare), "--out", str(out))
    (tmp_path / "exists").mkdir()
    assert "exists: give a new folder" in fails(capsys, "export", str(run), "--out", str(tmp_path / "exists"))
    assert "does not exist: create it first" in fails(capsys, "export", str(run), "--out", str(tmp_path / "a" / "b"))
    # A disk that fills while the weights are written: one line, no folder, no temporary folder
    import errno

    from transformers import PreTrainedModel

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    line = fails(capsys, "export", str(run), "--out", str(out))
    assert "no space left on the device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "exists", "run"]
    # A disk too small for the weights is refused before anything loads
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    assert "free some space or export elsewhere" in fails(capsys, "export", str(run), "--out", str(out))
    assert not out.exists()


@pytest.mark.slow
def test_generate_samples_with_a_seed_stops_at_stop_strings_and_refuses_foreign_code(tmp_path, capsys, trained_run):
    run = str(trained_run.run)

    def gen(*extra) -> str:
        main(["generate", run, "--prompt", "Write a poem", "--max_new_tokens", "24", *extra])
        return capsys.readouterr().out

    a, b = gen("--temperature", "1.0", "--seed", "1"), gen("--temperature", "1.0", "--seed", "1")
    c = gen("--temperature", "1.0", "--seed", "2", "--top_k", "50", "--top_p", "0.9")
    assert a == b and a != c
    greedy = gen()
    word = greedy.split()[2]
    stopped = gen("--stop", word)
    assert stopped == cut(greedy, [word]).rstrip("\n") + "\n" and word not in stopped
    assert "greedy" in fails(capsys, "generate", run, "--prompt", "x", "--top_p", "0.5")
    assert "in (0, 1]" in fails(capsys, "generate", run, "--prompt", "x", "--temperature", "1", "--top_p", "2")
    assert "is not a folder" in fails(capsys, "generate", str(tmp_path / "nothing"), "--prompt", "x")
    # An exported folder whose code was changed is refused before any code runs
    out = tmp_path / "export"
    main(["export", run, "--out", str(out)])
    capsys.readouterr()
    # transformers would also import a custom_generate/ folder with trust_remote_code: no code of a folder runs
    marker = tmp_path / "RAN"
    (out / "custom_generate").mkdir()
    (out / "custom_generate" / "generate.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef generate(model, *a, **k):\n    raise SystemExit(9)\n"
    )
    main(["generate", str(out), "--prompt", "x", "--max_new_tokens", "2"])
    assert not marker.exists() and "tokens/s]" in capsys.readouterr().err
    code = out / "modeling_fff.py"
    code.write_text(code.read_text() + "\nimport os  # changed\n")
    assert "did not write" in fails(capsys, "generate", str(out), "--prompt", "x")


TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_keeps_a_conversation_and_reset_forgets_it(trained_run, capsys, monkeypatch):
    """``chat`` from standard input: each line a turn, the conversation kept (the second turn's prompt holds the
    first), ``/reset`` starts again, the end of input leaves."""
    import io

    prompts, answers = [], []
    from fff_lightning import generate

    real = generate.Talk.answer

    def answer(self, prompt):
        prompts.append(prompt)
        answers.append(real(self, prompt))
        return answers[-1]

    monkeypatch.setattr(generate.Talk, "answer", answer)
    real_load = generate.load

    def load(*a):  # the tiny model's tokenizer (Mistral's) has no chat template: give it one
        model, tokenizer, _, what = real_load(*a)
        tokenizer.chat_template = TEMPLATE
        return model, tokenizer, "chat_template", what

    monkeypatch.setattr(generate, "load", load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n/reset\nhello\n"))
    main(["chat", str(trained_run.run), "--max_new_tokens", "3", "--system", "Be brief."])
    got = capsys.readouterr()
    assert len(answers) == 3 and answers[0] == answers[2]  # after /reset the same first turn, the same answer
    assert got.out == "".join(a + "\n" for a in answers)  # streamed as generated
    assert "conversation forgotten" in got.err and got.err.count("tokens/s]") == 3
    assert [m["role"] for m in prompts[1]] == ["system", "user", "assistant", "user"]
    assert prompts[1][2]["content"] == answers[0].strip() and prompts[2] == prompts[0]


def test_the_streamer_never_prints_a_stop_string_split_across_tokens():
    class Tok:
        pieces = {1: "Hel", 2: "lo ", 3: "wor", 4: "ld", 5: "!", 6: "\u00e9"}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.pieces[i] for i in ids)

    written = []
    s = StopAwareStreamer(Tok(), ["o world"], written.append)
    s.put(torch.tensor([[9, 9]]))  # the prompt: skipped
    for i in (1, 2, 3, 4, 5):
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(written) == "Hell" and s.text == "Hell"
    written.clear()
    s = StopAwareStreamer(Tok(), [], written.append, skip_prompt=False)
    for i in (1, 2, 6):
        s.put(torch.tensor([i]))
    s.end()
    assert "".join(written) == "Hello \u00e9"
    assert Sampling().generate_kwargs(None)["do_sample"] is False
    kw = Sampling(0.7, 0.9, 40, ["\n\n"]).generate_kwargs("tok")
    assert kw["do_sample"] and kw["stop_strings"] == ["\n\n"] and kw["tokenizer"] == "tok"


@pytest.mark.slow
def test_predict_samples_with_its_seed_and_cuts_answers_at_stop_strings(tmp_path, trained_run):
    from fff_lightning.lightning_cli import run_lightning

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write a poem", "Add 2 and 3")))

    def predict(name: str, *extra) -> list[str]:
        args = ["predict", "--config", str(trained_run.run / "config.yaml"), "--model.adapter_path",
                str(trained_run.run / "adapter"), "--data.predict_file", str(prompts), "--out_dir",
                str(tmp_path / name), "--model.max_new_tokens", "16", "--trainer.enable_progress_bar", "false",
                *extra]  # fmt: skip
        run_lightning(args)
        (pred,) = (tmp_path / name).rglob("predictions.jsonl")
        return [json.loads(line)["answer"] for line in pred.read_text().splitlines()]

    greedy = predict("greedy")
    sampled = ["--model.sampling.temperature", "1.0", "--model.sampling.top_k", "100"]
    assert predict("s1", *sampled) == predict("s2", *sampled) != greedy  # seeded by model.seed
    word = greedy[0].split()[1]
    stopped = predict("stop", f"--model.sampling.stop=[{json.dumps(word)}]")
    assert stopped[0] == cut(greedy[0], [word]).strip() and word not in stopped[0]
