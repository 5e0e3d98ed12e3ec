"""Turn a row of one of the known schemas into training samples, then into token ids and labels.

A *sample* is a list of turns ``(role, text)`` with role ``user`` or ``assistant``. Two text styles:

* ``research``: the FFF study's ``"###USER: {question}\\n###ASSISTANT: {answer}"``; turns of a dialogue are joined
  with ``"\\n"``. Kept byte for byte so the step configs reproduce the research.
* ``chat_template``: the tokenizer's chat template (or ``chat_template`` given in the data config).

Every sample ends with EOS. Loss on ``all`` tokens (the research) or on ``assistant`` tokens only (the prompt's
labels are -100).

System messages (UltraChat has a few): the research ignored them; the rule here is that a system message is
prepended to the next user message followed by a blank line (``research`` style), or passed to the chat
template as a ``system`` message when the template accepts one.
"""

from __future__ import annotations

from collections.abc import Callable

from fff_lightning.errors import ConfigError

Turn = tuple[str, str]
Sample = list[Turn]

#: Required columns per schema.
SCHEMA_COLUMNS: dict[str, tuple[str, ...]] = {
    "magicoder": ("problem", "solution"),
    "metamath": ("query", "response"),
    "ultrachat": ("messages",),
    "artificial_thinker": ("prompt", "reasoning", "response"),
    "prompt_response": ("prompt", "response"),  # column names configurable per source
}
TEXT_STYLES = ("research", "chat_template")
LOSS_ON = ("all", "assistant")
USER, ASSISTANT = "###USER: ", "\n###ASSISTANT: "


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"column {column!r} holds {type(value).__name__}, not text: {str(value)[:60]!r}")
    return value


def _pair(q_col: str, a_col: str) -> Callable[[dict], list[Sample]]:
    return lambda row: [[("user", _text(row[q_col], q_col)), ("assistant", _text(row[a_col], a_col))]]


def _artificial_thinker(row: dict) -> list[Sample]:
    answer = f"{_text(row['reasoning'], 'reasoning')} {_text(row['response'], 'response')}"
    return [[("user", _text(row["prompt"], "prompt")), ("assistant", answer)]]


def _ultrachat(row: dict) -> list[Sample]:
    """One sample per assistant turn: the conversation up to and including that turn."""
    messages = row["messages"]
    if not isinstance(messages, list):
        raise TypeError(f"column 'messages' holds {type(messages).__name__}, not a list of {{role, content}}")
    turns: Sample = []
    samples: list[Sample] = []
    system = None
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TypeError(f"a message is not a {{role, content}} mapping: {str(m)[:60]!r}")
        role, content = m["role"], _text(m["content"], "messages.content")
        if role == "system":
            system = content
        elif role == "user":
            turns.append(("user", f"{system}\n\n{content}" if system else content))
            system = None
        elif role == "assistant":
            turns.append(("assistant", content))
            samples.append(list(turns))
        else:
            raise TypeError(f"unknown message role {role!r} (expected system, user, assistant)")
    return samples


def formatter(schema: str, prompt_column: str = "prompt", response_column: str = "response"):
    """The function ``row -> list[Sample]`` for a schema."""
    if schema == "magicoder":
        return _pair("problem", "solution")
    if schema == "metamath":
        return _pair("query", "response")
    if schema == "ultrachat":
        return _ultrachat
    if schema == "artificial_thinker":
        return _artificial_thinker
    if schema == "prompt_response":
        return _pair(prompt_column, response_column)
    raise ConfigError("schema", f"unknown schema {schema!r}; allowed: {', '.join(SCHEMA_COLUMNS)}")


def render_research(sample: Sample) -> tuple[str, list[tuple[int, int]]]:
    """The research's text and the character spans of assistant answers."""
    text, spans = "", []
    for i, (role, content) in enumerate(sample):
        if role == "user":
            text += ("\n" if i else "") + USER + content
        else:
            text += ASSISTANT
            spans.append((len(text), len(text) + len(content)))
            text += content
    return text, spans


def render_chat(sample: Sample, tokenizer, template: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text (no BOS: the tokenizer adds it) and the assistant answers' character spans."""
    messages = [{"role": r, "content": c} for r, c in sample]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    spans, pos = [], 0
    for role, content in sample:
        start = text.find(content, pos)
        if start < 0:
            raise ValueError("the chat template does not reproduce a message's text verbatim")
        pos = start + len(content)
        if role == "assistant":
            spans.append((start, pos))
    return text, spans


def tokenize_sample(
    sample: Sample, tokenizer, style: str, loss_on: str, max_seq_length: int, template: str | None = None
) -> dict:
    """Token ids, labels and a truncation flag for one sample; EOS closes it."""
    text, spans = render_research(sample) if style == "research" else render_chat(sample, tokenizer, template)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=loss_on == "assistant")
    ids = list(enc["input_ids"]) + [tokenizer.eos_token_id]
    if loss_on == "all":
        labels = list(ids)
    else:
        # A token is an answer token when its characters overlap an assistant span (SentencePiece's "▁Tom"
        # starts on the space before the answer); EOS is learned too.
        labels = [
            tok if any(start < b and end > a for a, b in spans) else -100
            for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ] + [tokenizer.eos_token_id]
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}
