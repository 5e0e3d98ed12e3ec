"""Which samples go into which batch, in which order: the seeded mix, length grouping, packing, resuming.

Every order is fixed once in ``setup``, so batches do not depend on dataloader workers or processes.
"""

from __future__ import annotations

import random

from torch.utils.data import DataLoader, Sampler

SHUFFLES = ("fff_lightning", "datasets")


def chunks(n: int, size: int) -> list[list[int]]:
    """Batches of ``size`` consecutive indices of ``range(n)`` (the last one shorter): the padded batch plan."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def mix_order(
    lengths: list[int], repeats: list[int], seed: int, shuffle: str = "fff_lightning"
) -> list[tuple[int, int]]:
    """Every training row of every source, ``repeat`` times, shuffled once with ``seed``.

    The rows are laid out source after source (each repeat a whole block), then shuffled: ``fff_lightning`` with
    Python's ``random.Random(seed)``; ``datasets`` with the permutation ``datasets.Dataset.shuffle(seed=seed)`` applies
    to a concatenation (NumPy's ``default_rng(seed).permutation``): the research's own mix, when the sources are
    listed in its order (MetaMathQA, Magicoder, UltraChat, ArtificialThinkerSet).
    """
    order = [(s, r) for s, (n, k) in enumerate(zip(lengths, repeats, strict=True)) for _ in range(k) for r in range(n)]
    if shuffle == "datasets":
        import numpy as np

        return [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    random.Random(seed).shuffle(order)
    return order


def group_by_length(order: list, length_of, batch_size: int, seed: int, mega: int = 50) -> list:
    """Reorder so each batch holds samples of similar length (less padding), keeping the mix random: sort within
    mega-batches of ``mega * batch_size`` samples, cut into batches, shuffle the batches with ``seed``."""
    size = mega * batch_size
    batches = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=length_of, reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return [x for b in batches for x in b]


def pack_batches(lengths: list[int], budget: int, seed: int | None = None, window: int = 1024) -> list[list[int]]:
    """Group sample indices into batches of at most ``budget`` tokens each (first-fit decreasing).

    Samples are packed within consecutive windows of ``window`` samples, so the mix stays as random as its order
    while bins fill up (typically 97-100% of the budget). With ``seed`` the batches are then shuffled, so long
    and short batches alternate; without it they keep their order (validation).
    """
    if any(n > budget for n in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a budget of {budget}")
    batches: list[list[int]] = []
    for start in range(0, len(lengths), window):
        bins: list[list[int]] = []
        room: list[int] = []
        for i in sorted(range(start, min(start + window, len(lengths))), key=lambda i: -lengths[i]):
            for b, free in enumerate(room):
                if lengths[i] <= free:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(budget - lengths[i])
        batches += [sorted(b) for b in bins]
    if seed is not None:
        random.Random(seed + 2).shuffle(batches)
    return batches


class PlannedBatchSampler(Sampler):
    """Yields batches planned in advance, skipping the first ``skip`` after a mid-epoch resume.

    Its length stays the full epoch's, as Lightning expects of a resumed loader (it counts the restored batches
    itself), so the schedule's total steps do not change on resume."""

    def __init__(self, batches: list[list[int]], skip: int = 0):
        self.batches = batches
        self.skip = skip

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        yield from self.batches[skip:]


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch correctly (no "not resumable" warning).

    The position itself travels in the data module's checkpoint state (``batches_done_in_epoch``, read from
    Lightning's own batch progress, which is exact even though Lightning prefetches a batch) and reaches the
    loader as its batch sampler's ``skip``; the loader has no state of its own to add.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
