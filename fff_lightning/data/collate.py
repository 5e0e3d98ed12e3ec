"""Turning tokenized samples into batches: padded rows, packed rows, left-padded prompts.

Every training batch carries ``num_tokens`` and ``num_samples`` (plain ints, counted on the CPU), so throughput and
tables are counted without reading anything back from the GPU, packed or not.
"""

from __future__ import annotations

import torch

from fff_lightning.data.formatting import IGNORE

#: Label of a position that is not scored (PyTorch's cross-entropy ``ignore_index``).


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """``(B, longest)`` tensor of the sequences, padded with ``value`` on the right (or the left)."""
    n = max(len(x) for x in seqs)
    out = torch.full((len(seqs), n), value, dtype=torch.long)
    for i, x in enumerate(seqs):
        if left:
            out[i, n - len(x) :] = torch.tensor(x, dtype=torch.long)
        else:
            out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


class PadCollator:
    """Right-pads a batch to its longest sample; padded labels are -100 and masked out of attention."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id),
            "labels": pad([r["labels"] for r in rows], IGNORE),
            "attention_mask": pad([[1] * len(x) for x in ids], 0),
            "source": torch.tensor([r["source"] for r in rows]),
            "sample_index": torch.tensor([r.get("index", -1) for r in rows]),
            "num_tokens": sum(len(x) for x in ids),
            "num_samples": len(rows),
        }


class PackCollator:
    """Packs a batch's samples into ONE row with no padding: ``(1, sum of lengths)``.

    Documents stay apart: ``position_ids`` restart at 0 for each sample (transformers then builds a
    block-diagonal causal mask, Unsloth runs varlen attention), ``packed_seq_lengths`` lists the samples' lengths
    (Unsloth reads it), and the first label of each sample is -100, so no sample is scored on predicting the
    next one's first token. Each sample's own first label is never scored in a padded batch either (the model
    shifts labels by one), so the scored tokens, and the loss of each, are the same as unpacked.
    """

    def __call__(self, rows: list[dict]) -> dict:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for r in rows:
            n = len(r["input_ids"])
            ids += r["input_ids"]
            labels += [IGNORE, *r["labels"][1:]]
            positions += range(n)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "packed_seq_lengths": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int32),
            "source": torch.tensor([r["source"] for r in rows]),
            "sample_index": torch.tensor([r.get("index", -1) for r in rows]),
            "num_tokens": len(ids),
            "num_samples": len(rows),
        }


class LeftPadCollator:
    """Left-pads prompts so generation continues each one from its last token."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        ids = [r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id, left=True),
            "attention_mask": pad([[1] * len(x) for x in ids], 0, left=True),
            "prompt": [r["prompt"] for r in rows],
        }
