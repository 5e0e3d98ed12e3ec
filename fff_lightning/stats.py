"""Intervals and verdicts for ``report``: is one arm's validation loss really lower than the other's?

* :func:`seed_interval`: the mean over seeds of a dataset's loss with a 95% Student-t interval (``scipy.stats.t``);
  it says how far another seed could move the mean, nothing about the data's own sampling.
* :func:`paired_difference`: arm A minus arm B on the same validation samples, seeds matched in pairs. With
  per-sample losses, a bootstrap over samples and over seed pairs (numpy's generator; both sources of variation),
  widened where needed to the t interval over the pairs' differences (a bootstrap over 3 seeds alone is too
  narrow); without them (runs from before the per-sample file), the t interval over the pairs only.
* :func:`verdict`: ``A lower``, ``B lower`` or ``no resolvable difference (95%)``.

Losses are ratios of sums (summed nats / scored tokens), as the tables are; every resample recomputes the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 4000


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int
    method: str

    def text(self, digits: int = 4) -> str:
        if self.n < 2 and self.method.startswith("t"):
            return f"{self.mean:.{digits}f} (n={self.n}, no interval)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}] (n={self.n})"


def seed_interval(values: list[float], level: float = LEVEL) -> Interval:
    """Mean of per-seed values with a two-sided Student-t interval (n - 1 degrees of freedom)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, "t over seeds")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / np.sqrt(n))
    return Interval(mean, mean - half, mean + half, n, "t over seeds")


def paired_difference(a: list, b: list, level: float = LEVEL, rng_seed: int = 0) -> Interval:
    """A - B on one dataset. ``a`` and ``b`` hold one entry per matched seed pair: either a float (the run's loss:
    t interval over the pairs' differences) or ``(loss_sums, tokens)``, arrays over the same samples in the same
    order (bootstrap over samples and pairs)."""
    if not a or len(a) != len(b):
        raise ValueError("paired_difference needs the same number (>= 1) of runs on each side")
    if all(isinstance(x, float | int) for x in (*a, *b)):
        d = seed_interval([x - y for x, y in zip(a, b, strict=True)], level)
        d.method = "t over seed pairs (no per-sample losses)"
        return d
    la, ta = (np.stack([np.asarray(x[i], dtype=float) for x in a]) for i in (0, 1))
    lb, tb = (np.stack([np.asarray(x[i], dtype=float) for x in b]) for i in (0, 1))
    if la.shape != lb.shape:
        raise ValueError("the two sides were validated on different samples")
    # A sample with no scored token (its answer cut off by max_seq_length) weighs nothing in any loss; left in, a
    # replicate drawing only such samples would divide 0 by 0.
    scored = (ta > 0).all(0) & (tb > 0).all(0)
    la, ta, lb, tb = la[:, scored], ta[:, scored], lb[:, scored], tb[:, scored]
    pairs, samples = la.shape
    if samples == 0:
        return Interval(float("nan"), float("nan"), float("nan"), pairs, "no sample has a scored token")
    point = float(np.mean(la.sum(1) / ta.sum(1) - lb.sum(1) / tb.sum(1)))
    rng = np.random.default_rng(rng_seed)
    # Samples: a multinomial count per sample (the same resample for every pair: the samples are shared);
    # pairs: drawn with replacement. Each replicate recomputes every loss as a ratio of sums.
    w = rng.multinomial(samples, np.full(samples, 1 / samples), size=BOOTSTRAP).astype(float)  # (B, samples)
    diff = (w @ la.T) / (w @ ta.T) - (w @ lb.T) / (w @ tb.T)  # (B, pairs)
    pick = rng.integers(0, pairs, size=(BOOTSTRAP, pairs))
    reps = np.take_along_axis(diff, pick, axis=1).mean(1)
    low, high = (float(q) for q in np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]))
    if pairs == 1:
        return Interval(point, low, high, 1, "bootstrap over samples (one seed pair: no seed variation)")
    # With a few seeds a bootstrap over them is too narrow (three differences of one sign never resample to 0):
    # the interval is the wider of it and a t interval over the pairs' differences.
    t = seed_interval(list(la.sum(1) / ta.sum(1) - lb.sum(1) / tb.sum(1)), level)
    return Interval(point, min(low, t.low), max(high, t.high), pairs,
                    "bootstrap over samples and seed pairs, widened to the t interval over pairs")  # fmt: skip


def verdict(d: Interval, a: str = "A", b: str = "B") -> str:
    """``A lower``, ``B lower`` or ``no resolvable difference (95%)``; no verdict from one seed pair (another seed
    can reverse what one pair shows) or from a loss that is not finite."""
    if not np.isfinite(d.mean):
        return "no verdict: a loss is not finite (a run diverged)"
    if d.n < 2:
        return "no verdict: one seed pair (another seed may reverse it; run more seeds)"
    if not (np.isfinite(d.low) and np.isfinite(d.high)):
        return "no verdict: the interval is not finite"
    if d.high < 0:
        return f"{a} lower"
    if d.low > 0:
        return f"{b} lower"
    return f"no resolvable difference ({LEVEL:.0%})"
