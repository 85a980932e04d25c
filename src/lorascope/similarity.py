"""Representational similarity between two sets of activations.

This module holds pure array functions (NumPy core; PyTorch tensors are
accepted and converted) for comparing the hidden states of two models on the
same inputs, e.g. a base model against its LoRA or fully fine-tuned version.

Centered Kernel Alignment (CKA)
-------------------------------
Given activations ``X`` of shape ``(n, d1)`` and ``Y`` of shape ``(n, d2)``
for the *same* ``n`` examples (rows must correspond), linear CKA
(Kornblith et al., 2019, "Similarity of Neural Network Representations
Revisited") is the normalised Hilbert-Schmidt Independence Criterion (HSIC)
between the linear kernels ``K = X X^T`` and ``L = Y Y^T``::

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

With column-centred features ``Xc``, ``Yc`` this has the feature-space form::

    CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

which costs ``O(n d^2)`` instead of ``O(n^2 d)``. CKA lies in ``[0, 1]``, is
1 for ``X == Y``, and is invariant to orthogonal transforms of either feature
space, to isotropic scaling, to adding a constant to every row, and to a
common permutation of the rows. It is *not* invariant to arbitrary invertible
linear maps (unlike CCA), which is what makes it meaningful when ``n`` is not
much larger than ``d``.

Two estimators
~~~~~~~~~~~~~~
* **Biased** (``debiased=False``, the default and the number usually quoted):
  the plug-in HSIC estimator. It is biased upwards for finite ``n``: two
  independent random representations with ``d`` comparable to ``n`` get a
  clearly positive CKA (roughly ``d / (n + d)`` for isotropic Gaussians).
* **Debiased** (``debiased=True``): every HSIC is replaced by the unbiased
  estimator of Song et al. (2012), as in Nguyen et al. (2021) and Kornblith's
  ``feature_space_linear_cka(debiased=True)``. Independent representations
  then score close to 0, but the value can be slightly negative, and it
  needs ``n > 3``. Only the HSIC terms are unbiased; the ratio is still only
  asymptotically unbiased.

Numerical care
~~~~~~~~~~~~~~
LLM hidden states carry large per-dimension offsets and a few "massive
activation" dimensions orders of magnitude larger than the rest. Forming
``X^T X - n mu mu^T`` then cancels catastrophically (and in float32 it
returns garbage). Everything here therefore

* converts to float64 before any arithmetic;
* centres the features explicitly (two-pass) in the in-memory functions;
* in :class:`StreamingCKA`, accumulates co-moment matrices about running
  means and combines partial results with the pairwise update of Chan,
  Golub & LeVeque (1979) (the batched form of Welford's algorithm), so a
  single streaming pass agrees with :func:`linear_cka` on the concatenated
  rows to about 1e-12, for any batching and any merge order;
* rescales by exact powers of two before taking Frobenius norms, so no
  intermediate over- or underflows and no rounding is introduced.

Inputs must be finite; a representation with all rows identical has zero
variance, CKA is undefined (0 / 0), and a ``ValueError`` is raised.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = [
    "linear_cka",
    "linear_cka_gram",
    "StreamingCKA",
    "cosine_similarity_rows",
    "relative_change",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def fold_comoment(s: np.ndarray, s_b: np.ndarray, n_a: int, n_b: int, delta_x: np.ndarray,
                  delta_y: np.ndarray) -> None:
    """The pairwise update of Chan et al. for a centred co-moment, in place: with delta = mu_B - mu_A,

        S = S_A + S_B + (n_A n_B / (n_A + n_B)) delta_x delta_y^T

    (S_A is `s`, about the running means; S_B is `s_b`, about the batch's own means). The one
    place this arithmetic lives: StreamingCKA, the drift accumulators and the drift diagnostics
    all fold with it."""
    s += s_b
    if n_a and n_b:
        s += np.outer((n_a * n_b / (n_a + n_b)) * delta_x, delta_y)


def fold_mean(mean: np.ndarray, mean_b: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """Move the running mean of n_a rows to that of n_a + n_b rows, in place; return delta = mu_B - mu_A
    (taken before the move, as :func:`fold_comoment` needs it)."""
    delta = mean_b - mean
    mean += delta * (n_b / (n_a + n_b))
    return delta


def _as_float64(a: Any, name: str) -> np.ndarray:
    """Convert a NumPy array, array-like or torch tensor to a float64 array.

    Torch is not imported here: if it was never imported by the caller, the
    input cannot be a tensor.
    """
    tensor_type = getattr(sys.modules.get("torch"), "Tensor", None)
    if tensor_type is not None and isinstance(a, tensor_type):
        if a.is_complex():
            raise TypeError(f"{name}: complex tensors are not supported")
        return a.detach().cpu().double().numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"{name}: expected real numeric data, got dtype {arr.dtype}"
        )
    return arr.astype(np.float64, copy=False)


def _check_2d(a: np.ndarray, name: str, min_rows: int = 1) -> None:
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (n_examples, n_features), "
            f"got shape {a.shape}"
        )
    if a.shape[0] < min_rows:
        raise ValueError(
            f"{name} needs at least {min_rows} rows (examples), got {a.shape[0]}"
        )
    if a.shape[1] < 1:
        raise ValueError(f"{name} has no features (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _prepare_pair(x: Any, y: Any, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    x = _as_float64(x, "x")
    y = _as_float64(y, "y")
    for a, name in ((x, "x"), (y, "y")):
        if a.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D with shape (n_examples, n_features), "
                f"got shape {a.shape}"
            )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            "x and y must have the same number of rows (examples): "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    _check_2d(x, "x", min_rows)
    _check_2d(y, "y", min_rows)
    for a, name in ((x, "x"), (y, "y")):
        if np.all(a == a[0]):
            raise ValueError(
                f"{name} is constant (all rows identical): its features have "
                "zero variance and CKA is undefined"
            )
    return x, y


def _pow2_exponent(maxabs: float) -> int:
    """Exponent e with maxabs * 2**-e in [0.5, 1); 0 for maxabs == 0."""
    if maxabs == 0.0 or not np.isfinite(maxabs):
        return 0
    return int(np.frexp(maxabs)[1])


def _centre_and_scale(a: np.ndarray) -> np.ndarray:
    """Column-centre ``a`` and rescale by an exact power of two (max |.| < 1)."""
    ac = a - a.mean(axis=0, keepdims=True)
    return np.ldexp(ac, -_pow2_exponent(float(np.abs(ac).max())))


def _debiased_helper(
    xty: float,
    sum_sq_rows_x: np.ndarray,
    sum_sq_rows_y: np.ndarray,
    sq_norm_x: float,
    sq_norm_y: float,
    n: int,
) -> float:
    """Unbiased HSIC (up to a factor n(n-3)) from feature-space quantities.

    Same as Kornblith's ``_debiased_dot_product_similarity_helper``:
    ``xty`` is ``||Yc^T Xc||_F^2``, ``sum_sq_rows_*`` are the squared row norms
    of the centred features (shape (n,)), ``sq_norm_*`` their sums.
    """
    return (
        xty
        - n / (n - 2.0) * float(sum_sq_rows_x @ sum_sq_rows_y)
        + sq_norm_x * sq_norm_y / ((n - 1.0) * (n - 2.0))
    )


def _ratio(num: float, den_x: float, den_y: float) -> float:
    if not (den_x > 0.0 and den_y > 0.0):
        raise ValueError(
            "CKA is undefined: a self-similarity term is not positive "
            f"(HSIC(x, x)={den_x!r}, HSIC(y, y)={den_y!r})"
        )
    return float(num / (den_x * den_y))


# ---------------------------------------------------------------------------
# in-memory CKA
# ---------------------------------------------------------------------------


def linear_cka(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same examples.

    Feature-space computation, ``O(n (d1 + d2)^2)`` time and
    ``O((d1 + d2)^2)`` extra memory; prefer this over :func:`linear_cka_gram`
    whenever ``n`` exceeds the feature dimensions.

    Parameters
    ----------
    x : array-like or torch.Tensor of shape (n, d1)
    y : array-like or torch.Tensor of shape (n, d2)
        Activations for the same ``n`` examples in the same row order. Any
        real dtype; converted to float64 (tensors via
        ``.detach().cpu().double()``).
    debiased : bool, default=False
        Use the unbiased HSIC estimator (Song et al., 2012) in numerator and
        denominator. Requires ``n > 3``; the result may be slightly negative.

    Returns
    -------
    float
        CKA in ``[0, 1]`` (biased) or approximately so (debiased).

    Raises
    ------
    ValueError
        If the inputs are not 2-D, have different numbers of rows, have
        ``n < 2`` (``n < 4`` when debiased), contain NaN/inf, or either input
        is constant (all rows equal), for which CKA is undefined.
    """
    x, y = _prepare_pair(x, y, min_rows=4 if debiased else 2)
    n = x.shape[0]
    xc = _centre_and_scale(x)
    yc = _centre_and_scale(y)

    xty = float(np.sum((yc.T @ xc) ** 2))
    xtx = float(np.sum((xc.T @ xc) ** 2))
    yty = float(np.sum((yc.T @ yc) ** 2))

    if not debiased:
        return _ratio(xty, np.sqrt(xtx), np.sqrt(yty))

    ssr_x = np.einsum("ij,ij->i", xc, xc)
    ssr_y = np.einsum("ij,ij->i", yc, yc)
    sq_x = float(ssr_x.sum())
    sq_y = float(ssr_y.sum())
    num = _debiased_helper(xty, ssr_x, ssr_y, sq_x, sq_y, n)
    den_x = _debiased_helper(xtx, ssr_x, ssr_x, sq_x, sq_x, n)
    den_y = _debiased_helper(yty, ssr_y, ssr_y, sq_y, sq_y, n)
    # den_* estimate ||Kc||_F^2 > 0; a non-positive value means degenerate data
    return _ratio(num, np.sqrt(max(den_x, 0.0)), np.sqrt(max(den_y, 0.0)))


def _centre_gram(gram: np.ndarray, unbiased: bool) -> np.ndarray:
    """Double-centre a Gram matrix (U-centre it when ``unbiased``)."""
    gram = gram.copy()
    n = gram.shape[0]
    if unbiased:
        np.fill_diagonal(gram, 0.0)
        means = gram.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0.0)
    else:
        means = gram.mean(axis=0)
        means -= means.mean() / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def linear_cka_gram(x: Any, y: Any, *, debiased: bool = False) -> float:
    """Linear CKA via centred Gram matrices ``K = X X^T`` and ``L = Y Y^T``.

    Mathematically identical to :func:`linear_cka` (Kornblith's
    ``cka(gram_linear(x), gram_linear(y), debiased)``) but costs
    ``O(n^2 (d1 + d2))`` time and ``O(n^2)`` memory; it exists mainly as an
    independent check of the feature-space formula. Features are
    column-centred before forming the Gram matrices; this does not change the
    result (double centring and U-centring both remove it) but avoids
    cancellation when activations have large offsets.

    Parameters and errors are as for :func:`linear_cka`; with
    ``debiased=True`` the Gram matrices are U-centred (diagonal removed),
    giving the unbiased HSIC estimator of Song et al. (2012).
    """
    x, y = _prepare_pair(x, y, min_rows=4 if debiased else 2)
    xc = _centre_and_scale(x)
    yc = _centre_and_scale(y)
    k = _centre_gram(xc @ xc.T, unbiased=debiased)
    l = _centre_gram(yc @ yc.T, unbiased=debiased)
    hsic_kl = float(k.ravel() @ l.ravel())
    return _ratio(hsic_kl, float(np.linalg.norm(k)), float(np.linalg.norm(l)))


# ---------------------------------------------------------------------------
# streaming CKA
# ---------------------------------------------------------------------------


class StreamingCKA:
    """Exact (biased) linear CKA accumulated over batches in one pass.

    Memory is ``O((d1 + d2)^2)`` regardless of the number of rows. The state
    is the row count ``n``, the running means ``mu_x`` (d1,) and ``mu_y``
    (d2,), the co-moment matrices about those means::

        Sxx = sum_i (x_i - mu_x)(x_i - mu_x)^T        (d1, d1)
        Syy = sum_i (y_i - mu_y)(y_i - mu_y)^T        (d2, d2)
        Sxy = sum_i (x_i - mu_x)(y_i - mu_y)^T        (d1, d2)

    and per-column minima/maxima (used only to detect constant inputs
    exactly). Each batch is centred on its own mean, and partial states
    ``A`` and ``B`` are combined with the pairwise update of Chan et al.::

        delta = mu_B - mu_A,   n = n_A + n_B
        mu    = mu_A + delta * n_B / n
        S     = S_A + S_B + (n_A n_B / n) * delta_x delta_y^T

    so uncentred sums such as ``X^T X - n mu mu^T`` never appear; those
    cancel catastrophically on LLM hidden states with large offsets and
    massive-activation dimensions. Then
    ``CKA = ||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)``, equal to
    :func:`linear_cka` on all rows concatenated up to rounding (~1e-12), for
    any batch sizes (including 1) and any order of :meth:`merge`.

    Only the standard (biased) estimator is provided: the debiased one needs
    the per-row products of centred squared norms about the *final* means,
    which a single pass with fixed memory cannot provide.

    Parameters
    ----------
    dim_x, dim_y : int, optional
        Feature dimensions ``d1`` and ``d2``; inferred from the first
        :meth:`update` (or :meth:`merge`) when omitted, and checked against
        every later batch.

    Examples
    --------
    >>> acc = StreamingCKA()
    >>> for xb, yb in batches:            # doctest: +SKIP
    ...     acc.update(xb, yb)
    >>> acc.value()                       # doctest: +SKIP

    Distributed use: gather each rank's :meth:`state_dict` (plain arrays and
    ints), rebuild with :meth:`from_state_dict` and :meth:`merge` them; the
    co-moments are not plain sums, so do not all-reduce them directly.
    """

    def __init__(self, dim_x: int | None = None, dim_y: int | None = None):
        for d, name in ((dim_x, "dim_x"), (dim_y, "dim_y")):
            if d is not None and (int(d) != d or d < 1):
                raise ValueError(f"{name} must be a positive integer, got {d!r}")
        self._dim_x = None if dim_x is None else int(dim_x)
        self._dim_y = None if dim_y is None else int(dim_y)
        self._n = 0
        self._mean_x: np.ndarray | None = None
        self._mean_y: np.ndarray | None = None
        self._sxx: np.ndarray | None = None
        self._syy: np.ndarray | None = None
        self._sxy: np.ndarray | None = None
        self._min_x: np.ndarray | None = None
        self._max_x: np.ndarray | None = None
        self._min_y: np.ndarray | None = None
        self._max_y: np.ndarray | None = None

    # -- properties ---------------------------------------------------------

    @property
    def n(self) -> int:
        """Number of rows (examples) accumulated so far."""
        return self._n

    @property
    def dim_x(self) -> int | None:
        return self._dim_x

    @property
    def dim_y(self) -> int | None:
        return self._dim_y

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self._n}, dim_x={self._dim_x}, "
            f"dim_y={self._dim_y})"
        )

    # -- accumulation -------------------------------------------------------

    def _check_dims(self, dx: int | None, dy: int | None, what: str) -> None:
        """Check feature dims against known ones (None = unknown), then adopt."""
        if dx is not None and self._dim_x is not None and dx != self._dim_x:
            raise ValueError(f"{what}: x has {dx} features, expected {self._dim_x}")
        if dy is not None and self._dim_y is not None and dy != self._dim_y:
            raise ValueError(f"{what}: y has {dy} features, expected {self._dim_y}")
        if dx is not None:
            self._dim_x = dx
        if dy is not None:
            self._dim_y = dy

    def _absorb(
        self,
        n_b: int,
        mx_b: np.ndarray,
        my_b: np.ndarray,
        sxx_b: np.ndarray,
        syy_b: np.ndarray,
        sxy_b: np.ndarray,
        ext: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """Combine a partial state (owned arrays, not aliased) into self."""
        if self._n == 0:
            self._n = n_b
            self._mean_x, self._mean_y = mx_b, my_b
            self._sxx, self._syy, self._sxy = sxx_b, syy_b, sxy_b
            self._min_x, self._max_x, self._min_y, self._max_y = ext
            return
        n_a = self._n
        n = n_a + n_b
        dx = fold_mean(self._mean_x, mx_b, n_a, n_b)
        dy = fold_mean(self._mean_y, my_b, n_a, n_b)
        fold_comoment(self._sxx, sxx_b, n_a, n_b, dx, dx)
        fold_comoment(self._syy, syy_b, n_a, n_b, dy, dy)
        fold_comoment(self._sxy, sxy_b, n_a, n_b, dx, dy)
        np.minimum(self._min_x, ext[0], out=self._min_x)
        np.maximum(self._max_x, ext[1], out=self._max_x)
        np.minimum(self._min_y, ext[2], out=self._min_y)
        np.maximum(self._max_y, ext[3], out=self._max_y)
        self._n = n

    def update(self, x: Any, y: Any) -> StreamingCKA:
        """Add a batch of matching rows.

        Parameters
        ----------
        x : array-like or torch.Tensor of shape (b, d1)
        y : array-like or torch.Tensor of shape (b, d2)
            Any real dtype (float16/bfloat16/float32/...); accumulated in
            float64. Batches may have different sizes; ``b == 0`` is a no-op.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            On non-2-D input, different row counts, feature dimensions that
            differ from earlier batches, or NaN/inf values (the state is left
            unchanged).
        """
        x = _as_float64(x, "x")
        y = _as_float64(y, "y")
        for a, name in ((x, "x"), (y, "y")):
            if a.ndim != 2:
                raise ValueError(
                    f"{name} must be 2-D with shape (batch, n_features), "
                    f"got shape {a.shape}"
                )
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                "x and y must have the same number of rows: "
                f"got {x.shape[0]} and {y.shape[0]}"
            )
        _check_2d(x, "x", min_rows=0)
        _check_2d(y, "y", min_rows=0)
        self._check_dims(x.shape[1], y.shape[1], "update")
        b = x.shape[0]
        if b == 0:  # e.g. an empty shard: nothing to add
            return self
        mx = x.mean(axis=0)
        my = y.mean(axis=0)
        xc = x - mx
        yc = y - my
        ext = (x.min(axis=0), x.max(axis=0), y.min(axis=0), y.max(axis=0))
        self._absorb(b, mx, my, xc.T @ xc, yc.T @ yc, xc.T @ yc, ext)
        return self

    def merge(self, other: StreamingCKA) -> StreamingCKA:
        """Fold another accumulator's rows into this one (in place).

        The result is the same (to rounding) as if all rows had been passed
        to a single accumulator, whatever the order of merges. ``other`` is
        not modified.

        Returns
        -------
        self
        """
        if not isinstance(other, StreamingCKA):
            raise TypeError(f"can only merge a StreamingCKA, got {type(other)!r}")
        self._check_dims(other._dim_x, other._dim_y, "merge")
        if other._n == 0:
            return self
        self._absorb(
            other._n,
            other._mean_x.copy(),
            other._mean_y.copy(),
            other._sxx.copy(),
            other._syy.copy(),
            other._sxy.copy(),
            (
                other._min_x.copy(),
                other._max_x.copy(),
                other._min_y.copy(),
                other._max_y.copy(),
            ),
        )
        return self

    # -- result -------------------------------------------------------------

    def value(self) -> float:
        """Linear CKA of all rows seen so far.

        Raises
        ------
        ValueError
            If fewer than 2 rows were seen, or either representation is
            constant over all rows seen (CKA undefined).
        """
        if self._n < 2:
            raise ValueError(f"CKA needs at least 2 rows, got {self._n}")
        for lo, hi, name in (
            (self._min_x, self._max_x, "x"),
            (self._min_y, self._max_y, "y"),
        ):
            if np.array_equal(lo, hi):
                raise ValueError(
                    f"{name} is constant (all rows identical): its features "
                    "have zero variance and CKA is undefined"
                )
        # Scale x by 2**-p and y by 2**-q (exact): Sxx by 2**-2p, Syy by
        # 2**-2q, Sxy by 2**-(p+q); CKA is unchanged, nothing overflows.
        p = _pow2_exponent(float(np.sqrt(np.max(np.diag(self._sxx)))))
        q = _pow2_exponent(float(np.sqrt(np.max(np.diag(self._syy)))))
        sxx = np.ldexp(self._sxx, -2 * p)
        syy = np.ldexp(self._syy, -2 * q)
        sxy = np.ldexp(self._sxy, -(p + q))
        return _ratio(
            float(np.sum(sxy**2)),
            float(np.sqrt(np.sum(sxx**2))),
            float(np.sqrt(np.sum(syy**2))),
        )

    # -- serialisation ------------------------------------------------------

    _ARRAY_KEYS = (
        "mean_x",
        "mean_y",
        "sxx",
        "syy",
        "sxy",
        "min_x",
        "max_x",
        "min_y",
        "max_y",
    )

    def state_dict(self) -> dict[str, Any]:
        """Snapshot of the state as plain Python ints and float64 arrays.

        Keys: ``n``, ``dim_x``, ``dim_y`` (int, dims ``-1`` if unknown) and,
        when ``n > 0``, ``mean_x`` (d1,), ``mean_y`` (d2,), ``sxx`` (d1, d1),
        ``syy`` (d2, d2), ``sxy`` (d1, d2), ``min_x``/``max_x`` (d1,),
        ``min_y``/``max_y`` (d2,). Arrays are copies.
        """
        sd: dict[str, Any] = {
            "n": int(self._n),
            "dim_x": -1 if self._dim_x is None else int(self._dim_x),
            "dim_y": -1 if self._dim_y is None else int(self._dim_y),
        }
        if self._n > 0:
            for k in self._ARRAY_KEYS:
                sd[k] = getattr(self, "_" + k).copy()
        return sd

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> StreamingCKA:
        """Rebuild an accumulator from :meth:`state_dict` output.

        Array values may also be torch tensors or array-likes (e.g. after a
        collective); they are copied and converted to float64.
        """
        dim_x = int(state.get("dim_x", -1))
        dim_y = int(state.get("dim_y", -1))
        obj = cls(None if dim_x < 0 else dim_x, None if dim_y < 0 else dim_y)
        n = int(state["n"])
        if n < 0:
            raise ValueError(f"invalid state: n={n}")
        if n == 0:
            return obj
        arrays = {k: np.array(_as_float64(state[k], k), dtype=np.float64)
                  for k in cls._ARRAY_KEYS}
        d1 = arrays["mean_x"].shape[0]
        d2 = arrays["mean_y"].shape[0]
        expected = {
            "mean_x": (d1,), "mean_y": (d2,), "sxx": (d1, d1), "syy": (d2, d2),
            "sxy": (d1, d2), "min_x": (d1,), "max_x": (d1,), "min_y": (d2,),
            "max_y": (d2,),
        }
        for k, shape in expected.items():
            if arrays[k].shape != shape:
                raise ValueError(
                    f"invalid state: {k} has shape {arrays[k].shape}, "
                    f"expected {shape}"
                )
        obj._check_dims(d1, d2, "from_state_dict")
        obj._n = n
        for k, v in arrays.items():
            setattr(obj, "_" + k, v)
        return obj


# ---------------------------------------------------------------------------
# row-wise comparisons
# ---------------------------------------------------------------------------


def _prepare_rows(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_float64(x, "x")
    y = _as_float64(y, "y")
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"x and y must be 2-D (n, d), got shapes {x.shape} and {y.shape}"
        )
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {x.shape} and {y.shape}"
        )
    _check_2d(x, "x")
    _check_2d(y, "y")
    return x, y


def _row_norms(a: np.ndarray) -> np.ndarray:
    """Euclidean row norms, shape (n,).

    Each row is first rescaled by an exact power of two so that squaring
    cannot overflow or underflow.
    """
    e = np.frexp(np.abs(a).max(axis=1))[1]
    scaled = np.ldexp(a, -e[:, None])
    return np.ldexp(np.sqrt(np.einsum("ij,ij->i", scaled, scaled)), e)


def cosine_similarity_rows(x: Any, y: Any) -> np.ndarray:
    """Cosine similarity between matching rows of ``x`` and ``y``.

    Parameters
    ----------
    x, y : array-like or torch.Tensor of shape (n, d)

    Returns
    -------
    ndarray of shape (n,), float64
        ``<x_i, y_i> / (||x_i|| ||y_i||)``, clipped to ``[-1, 1]``. Rows where
        either ``x_i`` or ``y_i`` is exactly zero get ``nan`` (the angle is
        undefined); no warning is emitted.

    Raises
    ------
    ValueError
        If shapes differ, inputs are not 2-D or contain NaN/inf.
    """
    x, y = _prepare_rows(x, y)
    nx = _row_norms(x)
    ny = _row_norms(y)
    out = np.full(x.shape[0], np.nan)
    ok = (nx > 0) & (ny > 0)
    xu = x[ok] / nx[ok, None]
    yu = y[ok] / ny[ok, None]
    out[ok] = np.clip(np.einsum("ij,ij->i", xu, yu), -1.0, 1.0)
    return out


def relative_change(x: Any, y: Any) -> np.ndarray:
    """Relative change ``||y_i - x_i|| / ||x_i||`` of each row (Euclidean).

    ``x`` is the reference (e.g. base-model hidden states) and ``y`` the
    changed version (e.g. fine-tuned).

    Parameters
    ----------
    x, y : array-like or torch.Tensor of shape (n, d)

    Returns
    -------
    ndarray of shape (n,), float64
        Non-negative values. Rows with ``||x_i|| == 0`` get ``nan`` (relative
        change undefined), including when ``y_i`` is also zero; no warning
        is emitted.

    Raises
    ------
    ValueError
        If shapes differ, inputs are not 2-D or contain NaN/inf.
    """
    x, y = _prepare_rows(x, y)
    nx = _row_norms(x)
    nd = _row_norms(y - x)
    out = np.full(x.shape[0], np.nan)
    ok = nx > 0
    out[ok] = nd[ok] / nx[ok]
    return out
