"""Prompts to answer in ``predict``: read from a file, formatted like the training samples up to the answer, and
cut to fit the model's context with room for the answer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch.utils.data import Dataset

from fff_lightning.data.formatting import apply_template
from fff_lightning.errors import ConfigError

log = logging.getLogger(__name__)
#: A prompt file larger than this is refused before it is read (a prompt is text a person wrote, not a corpus).
MAX_FILE_BYTES = 1 << 30


class PromptRows(Dataset):
    """Prompts to answer in ``predict``, formatted like the training samples up to the answer.

    A prompt of more than ``max_tokens`` tokens keeps its first token (BOS) and its last ``max_tokens - 1``: the end
    of a prompt, nearest the answer, is what the answer continues. How many were cut is logged once."""

    def __init__(self, prompts: list[str], tokenizer, style: str, template: str | None, max_tokens: int | None = None):
        self.prompts = prompts
        self.tokenizer, self.style, self.template = tokenizer, style, template
        self.max_tokens = max_tokens
        self.cut: set[int] = set()

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        p = self.prompts[i]
        if self.style == "research":
            text = f"###USER: {p}\n###ASSISTANT:"
        else:
            text = apply_template(
                self.tokenizer, [{"role": "user", "content": p}], self.template, add_generation_prompt=True
            )
        from fff_lightning.tokenizer import encode

        ids = encode(self.tokenizer, text, sentencepiece=self.style == "research")[0]
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            ids = ids[:1] + ids[len(ids) - self.max_tokens + 1 :]
            if i not in self.cut:
                self.cut.add(i)
                log.warning(
                    "predict: prompt %d had more tokens than the %d that leave room for the answer "
                    "(max_seq_length - max_new_tokens): its beginning was cut",
                    i + 1,
                    self.max_tokens,
                )
        return {"input_ids": ids, "prompt": p}


def read_prompts(path: str) -> list[str]:
    """Prompts from a file:

    * ``.jsonl``: one JSON object with a text field ``prompt`` per line (a line of its own is a line between
      ``\\n``s; U+2028 and other Unicode line separators inside a JSON string are text);
    * ``.json``: a JSON array of prompts (strings, or objects with ``prompt``), or JSON lines as in ``.jsonl``;
    * anything else: plain text, one prompt per line (lines end at ``\\n``; a ``\\r`` before it is dropped).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.predict_file", f"no such file: {path}")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError("data.predict_file", f"{path} is {p.stat().st_size:,} bytes: more than 1 GiB of prompts")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError("data.predict_file", f"{path}, line {line}: not UTF-8; save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if p.suffix == ".json":
        prompts = _json_document(path, text)
        if prompts is None:  # not one JSON document: JSON lines under a .json name
            prompts = _json_lines(path, text)
    elif p.suffix == ".jsonl":
        prompts = _json_lines(path, text)
    else:
        prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise ConfigError("data.predict_file", f"{path} holds no prompt")
    return prompts


def _prompt_of(path: str, where: str, row) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise ConfigError("data.predict_file", f"{path}, {where}: needs a text field 'prompt'")


def _json_document(path: str, text: str) -> list[str] | None:
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError("data.predict_file", f"{path}: nested too deeply to be a list of prompts") from None
    except json.JSONDecodeError:
        return None
    if isinstance(data, dict):  # one object: one prompt (a one-line JSON lines file reads the same)
        data = [data]
    if not isinstance(data, list):
        raise ConfigError("data.predict_file", f"{path}: expected a JSON array of prompts; got {type(data).__name__}")
    return [_prompt_of(path, f"item {i + 1}", row) for i, row in enumerate(data)]


def _json_lines(path: str, text: str) -> list[str]:
    prompts = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError("data.predict_file", f"{path}, line {n}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise ConfigError("data.predict_file", f"{path}, line {n}: nested too deeply to be a prompt") from None
        if not isinstance(row, dict):
            raise ConfigError("data.predict_file", f"{path}, line {n}: needs a text field 'prompt'")
        prompts.append(_prompt_of(path, f"line {n}", row))
    return prompts
