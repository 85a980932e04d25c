"""Mathematical-property tests for lorascope.similarity (fixed seeds)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from lorascope.similarity import (
    StreamingCKA,
    cosine_similarity_rows,
    linear_cka,
    linear_cka_gram,
    relative_change,
)

TOL = 1e-10


# ---------------------------------------------------------------------------
# references and data
# ---------------------------------------------------------------------------


def ref_linear_cka(x, y):
    """Direct in-memory float64 reference (Kornblith feature-space formula)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    yc = y - y.mean(axis=0, keepdims=True)
    return np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )


def ref_unbiased_hsic(k, l):
    """Song et al. (2012) unbiased HSIC, written straight from the paper."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (
        np.trace(k @ l)
        + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ k @ l @ one)
    ) / (n * (n - 3))


def ref_debiased_cka(x, y):
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k, l = x @ x.T, y @ y.T
    return ref_unbiased_hsic(k, l) / np.sqrt(
        ref_unbiased_hsic(k, k) * ref_unbiased_hsic(l, l)
    )


def make_pair(seed, n=300, d1=40, d2=30, hard=False):
    """Correlated representations; ``hard`` adds LLM-like pathologies.

    hard: every feature gets an offset of 1e4..2e4, and 3 dimensions of each
    representation are 1000x larger (spread and offset) than the rest.
    """
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 10))
    x = z @ rng.standard_normal((10, d1)) + 0.5 * rng.standard_normal((n, d1))
    y = z @ rng.standard_normal((10, d2)) + 1.0 * rng.standard_normal((n, d2))
    if hard:
        for a, d in ((x, d1), (y, d2)):
            a += 1e4 * (1.0 + rng.random(d))
            a[:, rng.choice(d, size=min(3, d // 2), replace=False)] *= 1000.0
    return x, y


def random_split(rng, n, max_size):
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, max_size + 1), n - sum(sizes))))
    return sizes


def stream(x, y, sizes):
    acc = StreamingCKA()
    start = 0
    for b in sizes:
        acc.update(x[start : start + b], y[start : start + b])
        start += b
    assert start == x.shape[0] and acc.n == x.shape[0]
    return acc


def shards(x, y, sizes):
    out, start = [], 0
    for b in sizes:
        out.append(StreamingCKA().update(x[start : start + b], y[start : start + b]))
        start += b
    return out


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def naive_cka(x, y, dtype=np.float32):
    """What NOT to do: uncentred sums minus n mu mu^T."""
    x = x.astype(dtype)
    y = y.astype(dtype)
    n = dtype(x.shape[0])
    mx, my = x.mean(axis=0), y.mean(axis=0)
    sxx = x.T @ x - n * np.outer(mx, mx)
    syy = y.T @ y - n * np.outer(my, my)
    sxy = x.T @ y - n * np.outer(mx, my)
    return float(np.linalg.norm(sxy) ** 2 / (np.linalg.norm(sxx) * np.linalg.norm(syy)))


# ---------------------------------------------------------------------------
# linear_cka vs reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_cka_matches_reference(seed, hard):
    x, y = make_pair(seed, hard=hard)
    expected = ref_linear_cka(x, y)
    assert 0.05 < expected < 0.999  # a non-trivial value
    assert linear_cka(x, y) == pytest.approx(expected, abs=TOL)
    assert linear_cka(y, x) == pytest.approx(expected, abs=TOL)


def test_hard_data_defeats_naive_formula():
    """The offset/massive-dimension data really breaks X^T X - n mu mu^T."""
    x, y = make_pair(0, hard=True)
    expected = ref_linear_cka(x, y)
    with np.errstate(all="ignore"):
        naive32 = naive_cka(x, y, np.float32)
    assert not np.isfinite(naive32) or abs(naive32 - expected) > 1e-2
    # even in float64 it misses the 1e-10 tolerance (error ~1e-8 here)
    assert abs(naive_cka(x, y, np.float64) - expected) > 10 * TOL
    # ... while every method here stays within TOL
    assert abs(linear_cka(x, y) - expected) < TOL
    assert abs(stream(x, y, [1] * x.shape[0]).value() - expected) < TOL


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("hard", [False, True])
def test_self_similarity_is_one(debiased, hard):
    x, _ = make_pair(3, hard=hard)
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=TOL)
    assert linear_cka_gram(x, x, debiased=debiased) == pytest.approx(1.0, abs=TOL)
    assert StreamingCKA().update(x, x).value() == pytest.approx(1.0, abs=TOL)


# ---------------------------------------------------------------------------
# invariances
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_invariances(debiased):
    rng = np.random.default_rng(10)
    x, y = make_pair(4, n=120, d1=25, d2=20)
    base = linear_cka(x, y, debiased=debiased)
    qx = random_orthogonal(rng, x.shape[1])
    qy = random_orthogonal(rng, y.shape[1])
    np.testing.assert_allclose(qx.T @ qx, np.eye(x.shape[1]), atol=1e-12)
    perm = rng.permutation(x.shape[0])
    variants = {
        "orthogonal": (x @ qx, y @ qy),
        "isotropic scaling": (3.7 * x, 1e-3 * y),
        "row permutation": (x[perm], y[perm]),
        "translation": (x + 5.0, y - rng.standard_normal(y.shape[1])),
    }
    for name, (xv, yv) in variants.items():
        got = linear_cka(xv, yv, debiased=debiased)
        assert got == pytest.approx(base, abs=TOL), name
    # a non-isotropic rescaling of one feature does change CKA
    xs = x.copy()
    xs[:, 0] *= 10.0
    assert abs(linear_cka(xs, y, debiased=debiased) - base) > 1e-3


# ---------------------------------------------------------------------------
# estimators: feature-space vs Gram, debiased behaviour
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("seed", [5, 6])
def test_feature_and_gram_forms_agree(seed, hard, debiased):
    x, y = make_pair(seed, n=150, d1=60, d2=20, hard=hard)
    a = linear_cka(x, y, debiased=debiased)
    b = linear_cka_gram(x, y, debiased=debiased)
    assert a == pytest.approx(b, abs=TOL)


@pytest.mark.parametrize("seed", [7, 8])
def test_debiased_matches_song_et_al_formula(seed):
    # independent transcription of the unbiased HSIC; centred input keeps the
    # naive O(n^3) reference accurate
    x, y = make_pair(seed, n=30, d1=8, d2=5)
    x -= x.mean(0)
    y -= y.mean(0)
    expected = ref_debiased_cka(x, y)
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, abs=TOL)
    assert linear_cka_gram(x, y, debiased=True) == pytest.approx(expected, abs=TOL)
    # the U-statistic ignores constant offsets
    assert linear_cka(x + 3.0, y - 2.0, debiased=True) == pytest.approx(
        expected, abs=TOL
    )


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_debiased_removes_bias_on_independent_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 50))
    y = rng.standard_normal((200, 50))
    biased = linear_cka(x, y)
    debiased = linear_cka(x, y, debiased=True)
    assert biased > 0.1
    assert abs(debiased) < 0.05


# ---------------------------------------------------------------------------
# StreamingCKA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("seed", [20, 21])
def test_streaming_equals_in_memory_for_any_split(seed, hard):
    x, y = make_pair(seed, hard=hard)
    n = x.shape[0]
    expected = ref_linear_cka(x, y)
    rng = np.random.default_rng(seed)
    splits = {
        "one batch": [n],
        "size 1": [1] * n,
        "size 1 then rest": [1, 1, 1, n - 3],
        "rest then size 1": [n - 3, 1, 1, 1],
        "uneven": [7, 1, 50, 2, 100, 1, n - 161],
        "random small": random_split(rng, n, 5),
        "random large": random_split(rng, n, 120),
    }
    for name, sizes in splits.items():
        got = stream(x, y, sizes).value()
        assert abs(got - expected) < TOL, (name, got, expected)


@pytest.mark.parametrize("hard", [False, True])
def test_streaming_merge_in_any_order(hard):
    x, y = make_pair(22, hard=hard)
    n = x.shape[0]
    expected = ref_linear_cka(x, y)
    rng = np.random.default_rng(22)
    parts = shards(x, y, [1, 60, 1, 2, 90, 37, 1, n - 192])

    def fold(order):
        acc = StreamingCKA()
        for i in order:
            acc.merge(parts[i])
        return acc

    orders = [list(range(len(parts))), list(range(len(parts)))[::-1]]
    orders += [list(rng.permutation(len(parts))) for _ in range(4)]
    for order in orders:
        acc = fold(order)
        assert acc.n == n
        assert abs(acc.value() - expected) < TOL, order

    # balanced tree reduction (as in an all-gather + pairwise reduce)
    level = [StreamingCKA.from_state_dict(p.state_dict()) for p in parts]
    while len(level) > 1:
        nxt = [a.merge(b) for a, b in zip(level[::2], level[1::2])]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    assert abs(level[0].value() - expected) < TOL

    # merging leaves the source untouched; empty accumulators are neutral
    before = parts[1].state_dict()
    acc = StreamingCKA().merge(parts[1]).merge(StreamingCKA())
    for k, v in before.items():
        np.testing.assert_array_equal(parts[1].state_dict()[k], v)
    assert acc.value() == parts[1].value()

    # mixing update() and merge()
    acc = StreamingCKA().update(x[:100], y[:100])
    acc.merge(stream(x[100:], y[100:], [3, 1, n - 104]))
    assert abs(acc.value() - expected) < TOL


def test_streaming_dims_and_empty_batches():
    x, y = make_pair(23, n=50, d1=6, d2=4)
    acc = StreamingCKA(dim_x=6, dim_y=4)
    assert acc.n == 0
    acc.update(x[:0], y[:0])  # empty batch is a no-op
    acc.update(x[:20], y[:20]).update(x[20:], y[20:])
    assert acc.n == 50 and (acc.dim_x, acc.dim_y) == (6, 4)
    assert acc.value() == pytest.approx(ref_linear_cka(x, y), abs=TOL)
    with pytest.raises(ValueError, match="features"):
        acc.update(x[:, :5], y)
    with pytest.raises(ValueError, match="features"):
        StreamingCKA(dim_x=5).update(x, y)
    with pytest.raises(ValueError, match="features"):
        acc.merge(StreamingCKA().update(y, x))
    with pytest.raises(TypeError):
        acc.merge("not an accumulator")


def test_streaming_validation():
    x, y = make_pair(24, n=20, d1=4, d2=3)
    acc = StreamingCKA()
    with pytest.raises(ValueError, match="at least 2"):
        acc.value()
    acc.update(x[:1], y[:1])
    with pytest.raises(ValueError, match="at least 2"):
        acc.value()
    with pytest.raises(ValueError, match="same number of rows"):
        acc.update(x[:3], y[:2])
    with pytest.raises(ValueError, match="2-D"):
        acc.update(x[0], y[0])
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        acc.update(bad, y[:3])
    assert acc.n == 1  # failed updates leave the state alone
    const = StreamingCKA().update(np.ones((5, 4)), y[:5])
    const.update(np.ones((3, 4)), y[5:8])
    with pytest.raises(ValueError, match="constant"):
        const.value()
    with pytest.raises(ValueError):
        StreamingCKA(dim_x=0)


def test_streaming_fast_enough_for_llm_sizes():
    # d=1000, b=2000 must use matrix products, not row loops (a few hundred ms)
    rng = np.random.default_rng(25)
    x = rng.standard_normal((2000, 1000)).astype(np.float32)
    acc = StreamingCKA().update(x, x[:, :500])
    assert acc.n == 2000 and 0.0 < acc.value() <= 1.0 + TOL


# ---------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------


def test_state_dict_round_trip():
    x, y = make_pair(30, hard=True)
    acc = stream(x[:100], y[:100], [50, 1, 49])
    sd = acc.state_dict()
    assert isinstance(sd["n"], int) and sd["n"] == 100
    assert (sd["dim_x"], sd["dim_y"]) == (x.shape[1], y.shape[1])
    arrays = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}
    assert set(arrays) >= {"mean_x", "mean_y", "sxx", "syy", "sxy"}
    assert all(v.dtype == np.float64 for v in arrays.values())
    assert set(sd) - set(arrays) == {"n", "dim_x", "dim_y"}
    assert sd["sxx"].shape == (x.shape[1], x.shape[1])
    assert sd["sxy"].shape == (x.shape[1], y.shape[1])

    restored = StreamingCKA.from_state_dict(sd)
    assert restored.n == acc.n
    assert restored.value() == acc.value()

    # the snapshot is a copy: mutating it or the original does not leak
    sd["sxx"][:] = 0.0
    assert restored.value() == acc.value()
    acc.update(x[100:], y[100:])
    restored.update(x[100:], y[100:])
    assert restored.value() == acc.value()
    assert abs(restored.value() - ref_linear_cka(x, y)) < TOL

    # empty accumulators round-trip too
    empty = StreamingCKA.from_state_dict(StreamingCKA(dim_x=3).state_dict())
    assert empty.n == 0 and empty.dim_x == 3 and empty.dim_y is None

    # corrupted state is rejected
    bad = acc.state_dict()
    bad["sxy"] = bad["sxy"][:, :-1]
    with pytest.raises(ValueError, match="sxy"):
        StreamingCKA.from_state_dict(bad)


def test_state_dict_gather_and_merge_like_distributed():
    x, y = make_pair(31, hard=True)
    n = x.shape[0]
    rank_rows = np.array_split(np.arange(n), 4)
    gathered = [
        stream(x[r], y[r], [len(r) // 2, len(r) - len(r) // 2]).state_dict()
        for r in rank_rows
    ]
    total = functools.reduce(
        lambda a, b: a.merge(b),
        (StreamingCKA.from_state_dict(s) for s in gathered[::-1]),
    )
    assert total.n == n
    assert abs(total.value() - ref_linear_cka(x, y)) < TOL


# ---------------------------------------------------------------------------
# input validation (in-memory)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [linear_cka, linear_cka_gram])
def test_input_validation(fn):
    x, y = make_pair(40, n=10, d1=4, d2=3)
    with pytest.raises(ValueError, match="same number of rows"):
        fn(x, y[:-1])
    with pytest.raises(ValueError, match="2-D"):
        fn(x[:, 0], y)
    with pytest.raises(ValueError, match="2-D"):
        fn(x, y[None])
    with pytest.raises(ValueError, match="at least 2"):
        fn(x[:1], y[:1])
    with pytest.raises(ValueError, match="at least 4"):
        fn(x[:3], y[:3], debiased=True)
    for bad_value in (np.nan, np.inf, -np.inf):
        bad = x.copy()
        bad[2, 1] = bad_value
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(bad, y)
        with pytest.raises(ValueError, match="NaN or infinite"):
            fn(y, bad)
    const = np.full_like(x, 7.25)
    with pytest.raises(ValueError, match="constant"):
        fn(const, y)
    with pytest.raises(ValueError, match="constant"):
        fn(x, np.tile(y[:1], (10, 1)), debiased=True)
    with pytest.raises(TypeError):
        fn(x.astype(np.complex128), y)
    # smallest valid inputs work
    assert fn(x[:2], y[:2]) == pytest.approx(1.0, abs=TOL)
    assert np.isfinite(fn(x[:4], y[:4], debiased=True))


# ---------------------------------------------------------------------------
# torch inputs
# ---------------------------------------------------------------------------


def test_torch_inputs_match_numpy():
    torch = pytest.importorskip("torch")
    x, y = make_pair(50, n=80, d1=12, d2=9, hard=True)
    expected = linear_cka(x, y)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert linear_cka(tx, ty) == expected
    assert linear_cka(tx.requires_grad_(True), ty) == expected
    assert linear_cka(tx, y) == expected  # mixed inputs
    assert linear_cka_gram(tx, ty, debiased=True) == pytest.approx(
        linear_cka_gram(x, y, debiased=True), abs=TOL
    )
    assert StreamingCKA().update(tx[:30], ty[:30]).update(tx[30:], ty[30:]).value() == (
        pytest.approx(expected, abs=TOL)
    )
    # lower precision: same value as numpy on the same rounded data
    x_small, _ = make_pair(50, n=80, d1=12, d2=9)  # fits float16's range
    for dt, xt in ((torch.float32, tx), (torch.bfloat16, tx), (torch.float16, x_small)):
        x_lp = torch.as_tensor(xt).detach().to(dt)
        xs = x_lp.double().numpy()
        assert linear_cka(x_lp, ty) == linear_cka(xs, y)
        assert StreamingCKA().update(x_lp, ty).value() == pytest.approx(
            linear_cka(xs, y), abs=TOL
        )
    # hidden states beyond float16's range overflow to inf: rejected, not silent
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_cka(tx.detach().to(torch.float16), ty)
    a, b = x[:5, :5], y[:5, :5]
    np.testing.assert_array_equal(
        cosine_similarity_rows(torch.from_numpy(a), torch.from_numpy(b)),
        cosine_similarity_rows(a, b),
    )
    np.testing.assert_array_equal(
        relative_change(torch.from_numpy(a), b), relative_change(a, b)
    )


# ---------------------------------------------------------------------------
# row-wise measures
# ---------------------------------------------------------------------------


def test_cosine_similarity_rows():
    rng = np.random.default_rng(60)
    x = rng.standard_normal((50, 16))
    y = rng.standard_normal((50, 16))
    got = cosine_similarity_rows(x, y)
    direct = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert got.shape == (50,) and got.dtype == np.float64
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-14)
    np.testing.assert_allclose(cosine_similarity_rows(x, x), 1.0, atol=1e-14)
    np.testing.assert_allclose(cosine_similarity_rows(x, -2.5 * x), -1.0, atol=1e-14)
    # no overflow/underflow for extreme magnitudes
    extreme = cosine_similarity_rows(1e200 * x, 1e-200 * y)
    np.testing.assert_allclose(extreme, direct, atol=1e-14)
    # orthogonal pair
    assert cosine_similarity_rows([[1.0, 0.0]], [[0.0, 3.0]])[0] == 0.0
    # zero rows give nan (angle undefined), silently
    x[3] = 0.0
    y[7] = 0.0
    with np.errstate(all="raise"):
        got = cosine_similarity_rows(x, y)
    assert np.isnan(got[3]) and np.isnan(got[7])
    assert np.isfinite(np.delete(got, [3, 7])).all()
    with pytest.raises(ValueError, match="same shape"):
        cosine_similarity_rows(x, y[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        cosine_similarity_rows(x, np.where(y > 1, np.nan, y))


def test_relative_change():
    rng = np.random.default_rng(61)
    x = rng.standard_normal((40, 10)) + 1e4
    y = x + 1e-3 * rng.standard_normal((40, 10))
    got = relative_change(x, y)
    direct = np.linalg.norm(y - x, axis=1) / np.linalg.norm(x, axis=1)
    assert got.shape == (40,)
    np.testing.assert_allclose(got, direct, rtol=1e-12)
    np.testing.assert_array_equal(relative_change(x, x), 0.0)
    np.testing.assert_allclose(relative_change(x, 3 * x), 2.0, rtol=1e-14)
    assert relative_change([[3.0, 4.0]], [[3.0, 4.0 + 5.0]])[0] == 1.0
    # not symmetric: x is the reference
    assert relative_change([[1.0, 0.0]], [[2.0, 0.0]])[0] == 1.0
    assert relative_change([[2.0, 0.0]], [[1.0, 0.0]])[0] == 0.5
    # zero reference rows give nan, even when y is zero too, silently
    x[0] = 0.0
    y[1] = x[1] = 0.0
    with np.errstate(all="raise"):
        got = relative_change(x, y)
    assert np.isnan(got[0]) and np.isnan(got[1])
    assert np.isfinite(got[2:]).all()
    with pytest.raises(ValueError, match="2-D"):
        relative_change(x[0], y[0])
    with pytest.raises(ValueError, match="same shape"):
        relative_change(x, y[:-1])


def test_all_splits_of_a_tiny_problem():
    # exhaustive: every composition of n=7 into batches, with hard data
    x, y = make_pair(70, n=7, d1=3, d2=2, hard=True)
    expected = ref_linear_cka(x, y)
    n = x.shape[0]
    count = 0
    for cuts in itertools.product([False, True], repeat=n - 1):
        sizes, cur = [], 1
        for c in cuts:
            if c:
                sizes.append(cur)
                cur = 1
            else:
                cur += 1
        sizes.append(cur)
        assert abs(stream(x, y, sizes).value() - expected) < TOL, sizes
        count += 1
    assert count == 2 ** (n - 1)
