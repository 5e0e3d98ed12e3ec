"""Prompts to answer in ``predict``: read from a file, formatted like the training samples up to the answer."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from fff_lightning.errors import ConfigError


class PromptRows(Dataset):
    """Prompts to answer in ``predict``, formatted like the training samples up to the answer."""

    def __init__(self, prompts: list[str], tokenizer, style: str, template: str | None):
        self.prompts = prompts
        self.tokenizer, self.style, self.template = tokenizer, style, template

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        p = self.prompts[i]
        if self.style == "research":
            text = f"###USER: {p}\n###ASSISTANT:"
        else:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
            text = text.removeprefix(self.tokenizer.bos_token or "")
        from fff_lightning.tokenizer import encode

        return {"input_ids": encode(self.tokenizer, text, sentencepiece=self.style == "research")[0], "prompt": p}


def read_prompts(path: str) -> list[str]:
    """Prompts from a ``.jsonl`` file (a ``prompt`` field per line) or a text file (one prompt per line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.predict_file", f"no such file: {path}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError("data.predict_file", f"{path}, line {line}: not UTF-8; save the file as UTF-8") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.predict_file", f"{path}, line {n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError("data.predict_file", f"{path}, line {n}: needs a text field 'prompt'")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError("data.predict_file", f"{path} holds no prompt")
    return prompts
