"""Interval and summary maths for the drift stage: pure NumPy functions.

Intervals are delete-a-group jackknife intervals (Quenouille, Tukey; the grouped form
of Efron & Tibshirani, ch. 11). The examples are split at random into ``G`` groups;
the statistic ``theta`` is recomputed ``G`` times, each time without one group
(``theta_(g)``), and ::

    se^2 = (G - 1) / G * sum_g (theta_(g) - mean_g theta_(g))^2
    interval = theta +- t_{G-1, 0.975} * se

The unit that is left out is a group of whole *examples* (prompts), never single
tokens: the tokens of one prompt are strongly correlated, the prompts are the
independent draws. The interval is for the value one would get on the whole population
of prompts the examples were drawn from (e.g. all MRPC-style sentence pairs), for these
fixed models; it does not cover training randomness (another seed gives other models).
Because every summary (averages over layers, ratios of drifts) is recomputed on the same
deletions, its interval accounts for the correlation between layers and between models.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# two-sided 95 %: the 0.975 quantile of Student's t for 1..30 degrees of freedom
_T975 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
CONFIDENCE = 0.95


def t975(df: int) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (a table, then Hill's expansion)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def jackknife_interval(value: float, leave_out: Any, *, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """95 % delete-a-group jackknife interval around `value` from the leave-one-group-out values.

    Parameters
    ----------
    value : the statistic on all data.
    leave_out : array-like (G,), the statistic without each group; G >= 2. NaN entries
        (statistic undefined without that group) make the interval undefined (None).
    bounds : optional (low, high) range of the statistic; the interval is clipped to it.

    Returns
    -------
    dict with ``value``, ``ci_low``, ``ci_high``, ``se`` and ``groups``.
    """
    loo = np.asarray(leave_out, dtype=np.float64)
    g = loo.size
    out: dict[str, Any] = {"value": _clean(value), "ci_low": None, "ci_high": None, "se": None, "groups": int(g)}
    if g < 2 or not np.isfinite(value) or not np.all(np.isfinite(loo)):
        return out
    se = math.sqrt((g - 1) / g * float(np.sum((loo - loo.mean()) ** 2)))
    half = t975(g - 1) * se
    lo, hi = value - half, value + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    out.update(ci_low=float(lo), ci_high=float(hi), se=se)
    return out


def _clean(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


# ---------------------------------------------------------------------------
# histograms for quantiles of 1 - cosine and of the relative change
# ---------------------------------------------------------------------------

#: Bin edges for non-negative quantities (1 - cosine, relative change): one bin [0, 1e-12),
#: then log-spaced bins 1 % wide up to 1e4, then [1e4, inf).
HIST_EDGES = np.concatenate([[0.0], np.geomspace(1e-12, 1e4, 3704), [np.inf]])
HIST_RESOLUTION = "log-spaced bins of relative width 1% from 1e-12 to 1e4 (values below 1e-12 count as 0)"


def histogram(values: np.ndarray) -> np.ndarray:
    """Counts of finite non-negative `values` in :data:`HIST_EDGES` bins (int64)."""
    v = values[np.isfinite(values)]
    idx = np.searchsorted(HIST_EDGES, v, side="right") - 1
    return np.bincount(np.clip(idx, 0, HIST_EDGES.size - 2), minlength=HIST_EDGES.size - 1).astype(np.int64)


def hist_quantiles(counts: np.ndarray, qs: tuple[float, ...]) -> list[float | None]:
    """Quantiles from :func:`histogram` counts, each reported at its bin's geometric centre.

    The first bin ([0, 1e-12)) reports 0 and the last ([1e4, inf)) reports 1e4, so the
    relative error is at most 0.5 % inside [1e-12, 1e4].
    """
    total = int(counts.sum())
    if total == 0:
        return [None] * len(qs)
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        b = int(np.searchsorted(cum, q * total, side="left"))
        b = min(max(b, 0), counts.size - 1)
        if b == 0:
            out.append(0.0)
        elif b == counts.size - 1:
            out.append(float(HIST_EDGES[-2]))
        else:
            out.append(float(math.sqrt(HIST_EDGES[b] * HIST_EDGES[b + 1])))
    return out


# ---------------------------------------------------------------------------
# example-level CKA with group deletions
# ---------------------------------------------------------------------------


def centred_gram(x: np.ndarray) -> np.ndarray:
    """Gram matrix of the column-centred rows of `x`, rescaled by a power of two (CKA-invariant)."""
    xc = np.asarray(x, dtype=np.float64)
    xc = xc - xc.mean(axis=0, keepdims=True)
    m = float(np.abs(xc).max())
    if m > 0:
        xc = np.ldexp(xc, -int(np.frexp(m)[1]))
    return xc @ xc.T


def subset_hsic(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Biased and unbiased HSIC of the Gram matrices `k`, `l` restricted to subsets of rows.

    Parameters
    ----------
    k, l : (n, n) Gram matrices of the same n examples (any common centring).
    w : (n, B) 0/1 weights; column b selects the rows of subset b (m_b = w[:, b].sum()).

    Returns
    -------
    biased, unbiased : (B,) arrays. ``biased`` is ``tr(K_S H L_S H)`` of the subset S
    (the plug-in HSIC up to a factor that cancels), ``unbiased`` is the estimator of
    Song et al. (2012); both scale the same way in numerator and denominator, so
    ``hsic(k,l) / sqrt(hsic(k,k) hsic(l,l))`` is the subset's CKA, as
    :func:`lorascope.similarity.linear_cka` would compute it on those rows.
    """
    with np.errstate(divide="ignore", invalid="ignore"):  # subsets too small for the estimator give inf/nan
        return _subset_hsic(k, l, w)


def _subset_hsic(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = w.sum(axis=0)
    kw, lw = k @ w, l @ w
    wkw, wlw = np.einsum("ib,ib->b", w, kw), np.einsum("ib,ib->b", w, lw)
    wmw = np.einsum("ib,ib->b", w, (k * l) @ w)
    biased = wmw - 2.0 / m * np.einsum("ib,ib,ib->b", w, kw, lw) + wkw * wlw / m**2
    # unbiased: the same sums with the diagonal of k and l removed
    dk, dl = np.diag(k)[:, None], np.diag(l)[:, None]
    k0w, l0w = kw - dk * w, lw - dl * w
    wk0w, wl0w = np.einsum("ib,ib->b", w, k0w), np.einsum("ib,ib->b", w, l0w)
    wm0w = wmw - np.einsum("ib,ib->b", w * w, dk * dl)
    unbiased = (wm0w + wk0w * wl0w / ((m - 1) * (m - 2))
                - 2.0 / (m - 2) * np.einsum("ib,ib,ib->b", w, k0w, l0w)) / (m * (m - 3))
    return biased, unbiased


def cka_from_hsic(kl: np.ndarray, kk: np.ndarray, ll: np.ndarray) -> np.ndarray:
    """CKA from HSIC terms; NaN where a self term is not positive."""
    den = np.sqrt(np.clip(kk, 0, None) * np.clip(ll, 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, kl / np.where(den > 0, den, 1.0), np.nan)


def leave_group_out_weights(group_of: np.ndarray, groups: int) -> np.ndarray:
    """(n, G) 0/1 matrix: column g keeps every example not in group g."""
    return (group_of[:, None] != np.arange(groups)[None, :]).astype(np.float64)


def zscore_columns(x: np.ndarray) -> np.ndarray:
    """Columns scaled to unit (population) standard deviation; constant columns become 0."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    sd = np.sqrt(np.mean(xc**2, axis=0))
    return xc * np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)


def zscore_state(state: dict[str, Any]) -> dict[str, Any]:
    """A :class:`~lorascope.similarity.StreamingCKA` state with both sides z-scored.

    Z-scoring multiplies each feature by 1 / its standard deviation, a diagonal map ``D``,
    so the co-moments become ``Dx Sxx Dx``, ``Dy Syy Dy`` and ``Dx Sxy Dy`` with
    ``std_j = sqrt(S_jj / n)`` taken from the accumulated state itself: exactly the
    CKA of globally z-scored features, with no second pass over the data. Features with
    zero variance are dropped (scale 0).
    """
    if state["n"] == 0:
        return state
    n = state["n"]
    out = dict(state)
    scale = {}
    for side, key in (("x", "sxx"), ("y", "syy")):
        var = np.diag(state[key]) / n
        scale[side] = np.where(var > 0, 1.0 / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    out["sxx"] = state["sxx"] * scale["x"][:, None] * scale["x"][None, :]
    out["syy"] = state["syy"] * scale["y"][:, None] * scale["y"][None, :]
    out["sxy"] = state["sxy"] * scale["x"][:, None] * scale["y"][None, :]
    return out
