"""The real Mistral-7B tokenizer, offline, from the ``mistral-common`` package.

``mistral_common/data/tokenizer.model.v1`` is Mistral-7B-v0.1's SentencePiece model (32,000 tokens, bos 1,
eos 2). ``LlamaTokenizer(vocab_file=...)`` silently builds a 3-token vocabulary in transformers 5, so we write
a folder that ``AutoTokenizer.from_pretrained`` reads the normal way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from fff_lightning.files import cache_dir, write_atomically


def mistral_tokenizer_dir() -> Path:
    """A folder holding Mistral-7B-v0.1's tokenizer, built from ``mistral-common`` on first use."""

    def build(folder: Path) -> None:
        import mistral_common

        src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        shutil.copy(src, folder / "tokenizer.model")
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 32768,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))

    return write_atomically(cache_dir() / "mistral-7b-v0.1-tokenizer", build)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """``save_pretrained``, plus the SentencePiece model (transformers 5 does not write it), so the folder gives
    research-style token ids too."""
    tokenizer.save_pretrained(folder)
    sp = sentencepiece_model(tokenizer)
    if sp is not None:
        (Path(folder) / "tokenizer.model").write_bytes(sp.serialized_model_proto())


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """``AutoTokenizer`` for a hub id, folder or GGUF source; ``None`` gives the offline Mistral-7B tokenizer.

    Mistral has no pad token; we pad with ``<unk>`` (id 0) so padding is never mistaken for end of text.
    Padded positions are masked out of the loss anyway.
    """
    from transformers import AutoTokenizer

    from fff_lightning import model_source

    name = model_source.local_model(str(name_or_path or mistral_tokenizer_dir()))  # a GGUF file's: its folder's
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # no network, an unknown id, a gated repository, a folder without one
        from fff_lightning.errors import ConfigError

        raise ConfigError(
            "tokenizer",
            f"cannot load the tokenizer {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); check the id, "
            "the network and access, or give a local folder; offline (HF_HUB_OFFLINE), fetch it first where the "
            "network is: `python -m fff_lightning download --config <this run's config>`",
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok


def sentencepiece_model(tokenizer):
    """The tokenizer's own SentencePiece model (Mistral and Llama tokenizers have one), or ``None``.

    Looked up as the tokenizer's ``vocab_file``, a ``tokenizer.model`` beside it, in the hub cache, and finally as
    mistral-common's Mistral-7B-v0.1 model when the tokenizer's vocabulary is that one. Cached on the tokenizer.
    """
    cached = tokenizer.__dict__.get("_fff_sentencepiece", False)
    if cached is not False:
        return cached
    import sentencepiece

    name = str(getattr(tokenizer, "name_or_path", "") or "")
    candidates = [getattr(tokenizer, "vocab_file", None)]
    if name and Path(name).is_dir():
        candidates.append(Path(name) / "tokenizer.model")
    elif name:
        try:
            from huggingface_hub import try_to_load_from_cache

            candidates.append(try_to_load_from_cache(name, "tokenizer.model"))
        except Exception:  # no hub client or no cache: the next candidate
            pass
    try:
        import mistral_common

        candidates.append(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    except ImportError:
        pass
    model = None
    for path in candidates:
        if isinstance(path, (str, Path)) and Path(path).is_file():
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            if _same_vocabulary(sp, tokenizer):
                model = sp
                break
    tokenizer.__dict__["_fff_sentencepiece"] = model
    return model


def _same_vocabulary(sp, tokenizer) -> bool:
    n = sp.get_piece_size()
    probe = [i for i in (3, 13, 28705, 28726, 264, 1233, n - 1) if i < n]
    return n == len(tokenizer) and tokenizer.convert_ids_to_tokens(probe) == [sp.id_to_piece(i) for i in probe]


def _pieces(tokenizer) -> bool:
    """Whether the tokenizer's vocabulary is a SentencePiece one (``▁`` marks a space): only such a tokenizer has a
    SentencePiece model whose ids can differ from its own (a byte-level BPE one, e.g. SmolLM2's, has none)."""
    return any("\u2581" in t for t in tokenizer.tokenize(" a  b"))


def encode(tokenizer, text: str, sentencepiece: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (BOS first) of ``text`` and each token's character span in it.

    With ``sentencepiece`` and a SentencePiece model at hand (:func:`sentencepiece_model`), the ids are
    SentencePiece's own: the transformers tokenizer rebuilt from the same model splits runs of spaces
    differently (``"a  b"``: ``▁a ▁▁ b`` against SentencePiece's ``▁a ▁ ▁b``), which changes code and indented text.
    Text is taken literally (``"<s>"`` in it is text, as for SentencePiece).
    """
    sp = sentencepiece_model(tokenizer) if sentencepiece else None
    if sentencepiece and sp is None and not tokenizer.__dict__.get("_fff_warned") and _pieces(tokenizer):
        tokenizer.__dict__["_fff_warned"] = True
        logging.getLogger(__name__).warning(
            "no SentencePiece model found for the tokenizer %r: research-style token ids are the transformers "
            "tokenizer's, which split runs of spaces differently (put its tokenizer.model beside it)",
            getattr(tokenizer, "name_or_path", ""),
        )
    if sp is None:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    chars = [0]  # chars[b] = the character index of byte b
    for i, ch in enumerate(text):
        chars.extend([i + 1] * len(ch.encode("utf-8")))
    pieces = sp.encode(text, return_type="proto").pieces
    ids = [tokenizer.bos_token_id] + [p.id for p in pieces]
    offsets = [(0, 0)] + [(chars[p.begin], chars[p.end]) for p in pieces]
    return ids, offsets
