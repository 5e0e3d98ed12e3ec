"""``python -m fff_lightning generate <source> --prompt TEXT`` and ``chat <source>``: text from a trained run or an
exported folder, streamed to the terminal.

``<source>`` is a run folder (its ``config.yaml`` and ``adapter/``: the base model with the adapters unmerged, as
``fit`` trained them), a folder written by ``export`` (LoRA merged, FFF as modules), a PEFT adapter folder, or any
Hugging Face model folder (a base model alone, to compare with). Decoding is greedy unless ``--temperature`` is above
0 (then ``--top_p``, ``--top_k`` and ``--seed``); ``--stop`` strings end an answer (they are not printed); prompts
are written as the run's training data was (``--format``: the chat template, the research's text, raw).
``generate`` answers each ``--prompt`` (or the text on standard input) once; ``chat`` keeps a conversation, one
line per turn (``/reset`` forgets it, ``/quit`` or end of input leaves; Ctrl-C stops an answer). The speed of each
answer (new tokens per second) goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fff_lightning.errors import ConfigError
from fff_lightning.generation import Sampling, StopAwareStreamer, check


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m fff_lightning {prog}", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("source", help="a run folder, an exported folder, a PEFT adapter folder or a model folder")
    if prog == "generate":
        p.add_argument("--prompt", action="append", default=[],
                       help="a prompt (repeat for several); none: standard input, read whole")  # fmt: skip
    p.add_argument("--system", default=None, help="a system message (with the chat template)")
    p.add_argument(
        "--format",
        choices=["auto", "chat", "research", "raw"],
        default="auto",
        help="how a prompt is written: the chat template, the research's ###USER/###ASSISTANT text, or "
        "as given; auto: as the run's training data was (a folder: its chat template where it has one)",
    )
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: no limit")
    p.add_argument("--seed", type=int, default=None, help="for sampling: the same seed gives the same answers")
    p.add_argument("--stop", action="append", default=[], help="a string that ends an answer (repeatable)")
    p.add_argument("--ignore_eos", action="store_true",
                   help="always generate --max_new_tokens tokens (for timing)")  # fmt: skip
    p.add_argument("--no-stream", dest="stream", action="store_false", help="print each answer whole")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                   help="of the weights (auto: a run's compute dtype, a folder's own)")  # fmt: skip
    return p


def main(argv: list[str]) -> None:
    """``argv``: the command's name (``generate`` or ``chat``), then its options."""
    prog, argv = (argv[0], argv[1:]) if argv and argv[0] in ("generate", "chat") else ("generate", argv)
    args = parser(prog).parse_args(argv)
    check(args.temperature, args.top_p, args.top_k, args.stop)
    if args.max_new_tokens < 1:
        raise ConfigError("--max_new_tokens", f"must be at least 1; got {args.max_new_tokens}")
    prompts = list(args.prompt) if prog == "generate" else []
    if prog == "generate" and not prompts:
        if sys.stdin.isatty():
            raise ConfigError("--prompt", "give a prompt (--prompt TEXT, or text on standard input)")
        prompts = [sys.stdin.read()]
        if not prompts[0].strip():
            raise ConfigError("--prompt", "standard input was empty: give a prompt")
    sampling = Sampling(args.temperature, args.top_p, args.top_k, list(args.stop))
    model, tokenizer, style, what = load(args.source, args.dtype)
    style = style if args.format == "auto" else {"chat": "chat_template"}.get(args.format, args.format)
    if style == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--format", f"{args.source} has no chat template: use --format raw (or research)")
    if style == "research":  # the format's next turn ends the answer
        sampling = Sampling(args.temperature, args.top_p, args.top_k, [*args.stop, "\n###USER:"])
    print(f"{what}; prompts as {_STYLE_NAMES[style]}, "
          f"{'greedy' if sampling.greedy else f'sampling at temperature {sampling.temperature}'}",
          file=sys.stderr)  # fmt: skip
    talk = Talk(model, tokenizer, sampling, args, style, _context(model))
    try:
        _run(prog, talk, prompts)
    except KeyboardInterrupt:
        import signal

        from fff_lightning.errors import Interrupted

        print(file=sys.stderr)
        raise Interrupted(f"interrupted by SIGINT: {prog} stopped", signal.SIGINT) from None


_STYLE_NAMES = {"chat_template": "the chat template", "research": "###USER/###ASSISTANT text", "raw": "raw text"}


def _run(prog: str, talk, prompts: list[str]) -> None:
    if prog == "generate":
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"### {i + 1}: {prompt[:80]}", flush=True)
            talk.answer([*talk.system(), {"role": "user", "content": prompt}])
        if len(talk.rates) > 2:
            import statistics

            print(f"[median of answers 2-{len(talk.rates)}: {statistics.median(talk.rates[1:]):.1f} tokens/s (the "
                  "first warms up)]", file=sys.stderr)  # fmt: skip
        return
    _chat(talk)


def _chat(talk) -> None:
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: leave
            print(file=sys.stderr)
            break
        text = line.strip()
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not text:
            continue
        turn = {"role": "user", "content": text}
        try:  # raw text: each line is a prompt of its own
            while True:
                try:
                    answer = talk.answer([*talk.system(), *history, turn] if talk.style != "raw" else [turn])
                    break
                except PromptTooLong as e:
                    if not history:  # this turn alone is too long: say so, and wait for the next
                        print(f"({e.message}: this turn is not kept)", file=sys.stderr)
                        answer = None
                        break
                    history = history[2:]
                    print("(the oldest turn is dropped: the conversation outgrew the model)", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C during an answer stops it; the turn is forgotten
            print("\n(stopped; this turn is not kept)", file=sys.stderr)
            continue
        if talk.style != "raw" and answer is not None:  # kept as the training data writes turns: stripped
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]


class PromptTooLong(ConfigError):
    """The prompt and the new tokens do not fit the model's positions."""


class Talk:
    """One model answering: the prompt tokenized (through the chat template or raw), the answer generated, streamed
    and cut at a stop string, its speed reported."""

    def __init__(self, model, tokenizer, sampling: Sampling, args, style: str, limit: int | None):
        """``style``: ``chat_template``, ``research`` or ``raw``; ``limit``: the model's positions, if known."""
        self.model, self.tokenizer, self.sampling, self.args, self.style = model, tokenizer, sampling, args, style
        self.limit = limit
        self.rates: list[float] = []  # new tokens per second of each answer

    def system(self) -> list[dict]:
        return [{"role": "system", "content": self.args.system}] if self.args.system else []

    def ids(self, messages: list[dict]):
        """The prompt's token ids, ``(1, n)``: the conversation so far written as the style says, up to the answer."""
        import torch

        tok = self.tokenizer
        if self.style == "chat_template":
            return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]  # fmt: skip
        if self.style == "raw":
            return tok(messages[-1]["content"], return_tensors="pt")["input_ids"]
        from fff_lightning.data.formatting import ASSISTANT, USER
        from fff_lightning.tokenizer import encode

        # The research's text (as predict writes it): a turn per line, no system message
        said = {"user": USER, "assistant": ASSISTANT}
        text = "".join(f"{said[m['role']]}{m['content']}\n" for m in messages if m["role"] in said)
        return torch.tensor([encode(tok, text + ASSISTANT.rstrip(), sentencepiece=True)[0]])

    def answer(self, messages: list[dict]) -> str:
        """Answer the conversation ``messages`` (its last message is the user's)."""
        import torch

        tok = self.tokenizer
        ids = self.ids(messages)
        n = ids.shape[1]
        if self.limit is not None and n + self.args.max_new_tokens > self.limit:
            raise PromptTooLong("--max_new_tokens", f"the prompt ({n} tokens) and {self.args.max_new_tokens} new "
                              f"tokens exceed the model's {self.limit} positions")  # fmt: skip
        device = next(self.model.parameters()).device
        if self.args.seed is not None:
            from transformers import set_seed

            set_seed(self.args.seed)
        streamer = StopAwareStreamer(tok, self.sampling.stop, _write) if self.args.stream else None
        kw = self.sampling.generate_kwargs(tok)
        if self.args.ignore_eos:
            kw["min_new_tokens"] = self.args.max_new_tokens
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                      max_new_tokens=self.args.max_new_tokens, pad_token_id=pad, streamer=streamer,
                                      **kw)  # fmt: skip
        seconds = time.perf_counter() - started
        new = out[0, n:]
        text = self.sampling.cut(tok.decode(new, skip_special_tokens=True))
        if streamer is None:
            _write(text)
        _write("\n")
        self.rates.append(len(new) / seconds)
        print(f"[{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s]", file=sys.stderr,
              flush=True)  # fmt: skip
        return text


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _context(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def load(source: str, dtype: str = "auto"):
    """``(model, tokenizer, how prompts are written by default, what it is)`` for a run folder, an exported folder, a
    PEFT adapter folder or a model folder; one line for anything else."""
    path = Path(source)
    if not path.is_dir():
        raise ConfigError("source", f"{source} is not a folder (give a run folder, an exported folder or a model "
                          "folder)")  # fmt: skip
    from fff_lightning.inference import is_run, run_model

    if is_run(path):
        model, tokenizer, style = run_model(path, [] if dtype == "auto" else ["--model.base.dtype", dtype])
        return model, tokenizer, style, f"run {path.name} (adapters unmerged)"
    if (path / "config.yaml").is_file():
        raise ConfigError("source", f"{source} is a run without trained adapters (no adapter/fff_adapter_config.json): "
                          "finish or resume it first")  # fmt: skip
    if (path / "adapter_config.json").is_file():
        return (*_peft(path, dtype), f"PEFT adapters {path.name}")
    if (path / "config.json").is_file():
        return (*_folder(path, dtype), f"model folder {path.name}")
    raise ConfigError("source", f"{source} holds no run (config.yaml + adapter/), no model (config.json) and no PEFT "
                      "adapters (adapter_config.json)")  # fmt: skip


def _folder(path: Path, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fff_lightning.export import exported_class

    config = json.loads((path / "config.json").read_text())
    cls = exported_class(path, config)  # an FFF export's class, from this package; no code from the folder runs
    model = _from_pretrained(cls or AutoModelForCausalLM, str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return _ready(model), tokenizer, _style(path, tokenizer)


def _style(path: Path, tokenizer) -> str:
    """How prompts are written for a folder: as its run's were where ``export`` wrote it, else through the chat
    template where the tokenizer has one, else raw."""
    try:
        style = json.loads((path / "fff_export.json").read_text()).get("text_style")
    except (OSError, ValueError, AttributeError):
        style = None
    if style == "research":
        return style
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "raw"


def _peft(path: Path, dtype: str):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = PeftConfig.from_pretrained(str(path))
    base = cfg.base_model_name_or_path
    model = _from_pretrained(AutoModelForCausalLM, base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(path))
    tok_from = path if (path / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_from))
    return _ready(model), tokenizer, _style(path, tokenizer)


def _from_pretrained(cls, path: str, **kwargs):
    """``cls.from_pretrained``, weights in a pickle that holds more than tensors refused in one line."""
    import pickle

    try:
        return cls.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:
        from fff_lightning.backends.hf import refused_pickle

        raise refused_pickle(path, e) from None
    except OSError as e:
        raise ConfigError("source", f"cannot load {path} ({str(e).splitlines()[0][:160]})") from None


def _ready(model):
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()
