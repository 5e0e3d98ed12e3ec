"""Turn a row of one of the known schemas into training samples, then into token ids and labels.

A *sample* is a list of turns ``(role, text)`` with role ``user`` or ``assistant``. Two text styles:

* ``research``: the FFF study's text, byte for byte: ``"###USER: {question}\\n###ASSISTANT: {answer}"`` for a
  question and its answer; a dialogue (UltraChat) as the research built it, every turn ending with ``"\\n"``
  (``"###USER: {u1}\\n###ASSISTANT: {a1}\\n###USER: {u2}\\n..."``). Its token ids are SentencePiece's own
  (:func:`fff_lightning.tokenizer.encode`), as the study's tokenizer produced them.
* ``chat_template``: the tokenizer's chat template (or ``chat_template`` given in the data config).

``eos`` closes every sample with EOS (the research added none). Loss on ``all`` tokens (the research) or on
``assistant`` tokens only (the prompt's labels are -100).

System messages (UltraChat has a few): ``system_turns="drop"`` ignores them, as the research did; ``"prepend"``
puts a system message before the next user message followed by a blank line (``research`` style), or passes it to
the chat template as a ``system`` message.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fff_lightning.errors import ConfigError

#: The label of a token that is not scored (PyTorch's cross-entropy ``ignore_index``).
IGNORE = -100

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
SYSTEM_TURNS = ("prepend", "drop")
USER, ASSISTANT = "###USER: ", "###ASSISTANT: "


class Dialogue(list):
    """A sample cut from a conversation (UltraChat): the research wrote every turn of it on its own line."""


def _text(value, column: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"column {column!r} holds {type(value).__name__}, not text: {str(value)[:60]!r}")
    return value


def _pair(q_col: str, a_col: str) -> Callable[[dict], list[Sample]]:
    return lambda row: [[("user", _text(row[q_col], q_col)), ("assistant", _text(row[a_col], a_col))]]


def _artificial_thinker(row: dict) -> list[Sample]:
    answer = f"{_text(row['reasoning'], 'reasoning')} {_text(row['response'], 'response')}"
    return [[("user", _text(row["prompt"], "prompt")), ("assistant", answer)]]


def _ultrachat(row: dict, system_turns: str = "prepend") -> list[Sample]:
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
            system = content if system_turns == "prepend" else None
        elif role == "user":
            turns.append(("user", f"{system}\n\n{content}" if system else content))
            system = None
        elif role == "assistant":
            turns.append(("assistant", content))
            samples.append(Dialogue(turns))
        else:
            raise TypeError(f"unknown message role {role!r} (expected system, user, assistant)")
    return samples


def formatter(schema: str, prompt_column: str = "prompt", response_column: str = "response", system_turns="prepend"):
    """The function ``row -> list[Sample]`` for a schema."""
    if schema == "magicoder":
        return _pair("problem", "solution")
    if schema == "metamath":
        return _pair("query", "response")
    if schema == "ultrachat":
        return lambda row: _ultrachat(row, system_turns)
    if schema == "artificial_thinker":
        return _artificial_thinker
    if schema == "prompt_response":
        return _pair(prompt_column, response_column)
    raise ConfigError("schema", f"unknown schema {schema!r}; allowed: {', '.join(SCHEMA_COLUMNS)}")


def render_research(sample: Sample) -> tuple[str, list[tuple[int, int]]]:
    """The research's text and the character spans of assistant answers.

    A question and its answer: ``###USER: {q}\\n###ASSISTANT: {a}``. A dialogue: every turn on its own line,
    ``###USER: {u}\\n`` and ``###ASSISTANT: {a}\\n``, the last one included."""
    dialogue = isinstance(sample, Dialogue)
    text, spans = "", []
    for i, (role, content) in enumerate(sample):
        text += "" if dialogue or i == 0 else "\n"
        text += USER if role == "user" else ASSISTANT
        if role == "assistant":
            spans.append((len(text), len(text) + len(content)))
        text += content + ("\n" if dialogue else "")
    return text, spans


def render_chat(sample: Sample, tokenizer, template: str | None) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text (no BOS: the tokenizer adds it) and the assistant answers' character spans, as the
    template renders them: many templates trim each message (Llama 3's ``| trim``; Qwen3 strips an answer's leading
    newlines), so real data whose messages begin or end with spaces or newlines is scored on the trimmed text.

    The template is rendered twice: once with the messages, once with a unique mark in place of each message. The
    marks cut the second text into the template's own fragments (role headers, end-of-turn tokens), which the first
    text must reproduce around each message's rendered text: the message itself, or it trimmed at either end. An
    answer's span takes in the EOS token the template closes it with (ChatML's ``<|im_end|>``), so the model
    learns to end its turn.
    """
    eos = tokenizer.eos_token or ""
    marks = [f"\ue000{i}\ue001" for i in range(len(sample))]  # private-use characters: in no real text
    text = apply_template(tokenizer, [{"role": r, "content": c} for r, c in sample], template)
    skeleton = apply_template(
        tokenizer, [{"role": r, "content": m} for (r, _), m in zip(sample, marks, strict=True)], template
    )
    fragments = re.split("\ue000\\d+\ue001", skeleton)
    if re.findall("\ue000(\\d+)\ue001", skeleton) != [str(i) for i in range(len(sample))]:
        raise ValueError("the chat template does not render each message once, in order")
    if not text.startswith(fragments[0]):
        raise ValueError("the chat template renders its start differently for these messages")
    spans, pos = [], len(fragments[0])
    for (role, content), after in zip(sample, fragments[1:], strict=True):
        for rendered in _renderings(content):
            if text.startswith(rendered, pos) and text.startswith(after, pos + len(rendered)):
                break
        else:
            raise ValueError(
                f"the chat template changes a {role} message's text beyond trimming its ends "
                f"(message starts {content[:40]!r})"
            )
        if role == "assistant":
            closed = len(eos) if eos and after.startswith(eos) else 0
            spans.append((pos, pos + len(rendered) + closed))
        pos += len(rendered) + len(after)
    if pos != len(text):
        raise ValueError("the chat template renders more text than its messages and fragments")
    return text, spans


def apply_template(tokenizer, messages: list[dict], template: str | None, **kwargs) -> str:
    """The chat template's text of ``messages`` (``kwargs`` to ``apply_chat_template``), without a BOS the tokenizer
    adds itself."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    return without_added_bos(tokenizer, text)


def without_added_bos(tokenizer, text: str) -> str:
    """A template's text without the BOS it starts with when the tokenizer adds that BOS itself (Mistral's ``<s>``);
    a BOS the tokenizer does not add stays (SmolLM2's is ``<|im_start|>``, the start of every ChatML turn)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos) :]
    return text


def adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts the BOS first (remembered on the tokenizer)."""
    known = tokenizer.__dict__.get("_fff_adds_bos")
    if known is None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        known = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
        tokenizer.__dict__["_fff_adds_bos"] = known
    return known


def _renderings(content: str) -> list[str]:
    """What a template may have made of a message: itself, or trimmed (all whitespace, or newlines only) at either
    end; the message itself first."""
    out = [content]
    for form in (content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"), content.lstrip("\n"),
                 content.rstrip("\n")):  # fmt: skip
        if form not in out:
            out.append(form)
    return out


def tokenize_sample(
    sample: Sample,
    tokenizer,
    style: str,
    loss_on: str,
    max_seq_length: int,
    template: str | None = None,
    eos: bool = True,
) -> dict:
    """Token ids, labels and a truncation flag for one sample; with ``eos``, EOS closes it."""
    from fff_lightning.tokenizer import encode

    text, spans = render_research(sample) if style == "research" else render_chat(sample, tokenizer, template)
    # Research text is plain text: SentencePiece's own ids. A chat template's text holds special tokens, which
    # only the transformers tokenizer reads as such.
    ids, offsets = encode(tokenizer, text, sentencepiece=style == "research")
    # A chat template that closes the last answer with EOS has closed the sample: no second EOS after it.
    closed = style != "research" and spans and text[: spans[-1][1]].endswith(tokenizer.eos_token or "\0")
    end = [tokenizer.eos_token_id] if eos and not closed else []
    if loss_on == "all":
        labels = ids + end
    else:
        # A token is an answer token when its characters overlap an assistant span (SentencePiece's "▁Tom"
        # starts on the space before the answer); EOS is learned too.
        labels = [
            tok if any(start < b and stop > a for a, b in spans) else IGNORE
            for tok, (start, stop) in zip(ids, offsets, strict=True)
        ] + end
    ids = ids + end
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}
