"""benchmarks/authors_drift_measure.py: the authors' formula and the pooling, against plain loops."""

from __future__ import annotations

import importlib.util

import numpy as np

from helpers import REPO
from lorascope.similarity import linear_cka

_spec = importlib.util.spec_from_file_location("authors_drift_measure",
                                               REPO / "benchmarks" / "authors_drift_measure.py")
adm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adm)


def _loop_authors(x, y):
    """shared/metrics.py:791-814 of benc61116/NLP, written out with loops in float64."""
    n, d = len(x), len(x[0])
    mx = [sum(float(x[i][j]) for i in range(n)) / n for j in range(d)]
    my = [sum(float(y[i][j]) for i in range(n)) / n for j in range(d)]
    xc = [[float(x[i][j]) - mx[j] for j in range(d)] for i in range(n)]
    yc = [[float(y[i][j]) - my[j] for j in range(d)] for i in range(n)]
    cross = [[sum(xc[i][a] * yc[i][b] for i in range(n)) for b in range(d)] for a in range(d)]  # Xc^T Yc
    numerator = sum(v * v for row in cross for v in row)  # trace(Yc^T Xc Xc^T Yc)
    norm_a = sum(v * v for row in xc for v in row)
    norm_b = sum(v * v for row in yc for v in row)
    return numerator / (norm_a * norm_b)


def test_the_authors_formula_is_transcribed_and_is_not_linear_cka():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5)) + 4.0
    y = x @ rng.normal(size=(5, 5)) + rng.normal(scale=0.3, size=(12, 5))
    assert abs(adm.authors_cka(x, y) - _loop_authors(x.tolist(), y.tolist())) < 1e-12
    # the same representation twice: linear CKA is 1, the authors' formula sum(s^4) / sum(s^2)^2 < 1
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    assert abs(adm.authors_cka(x, x) - (s ** 4).sum() / (s ** 2).sum() ** 2) < 1e-12
    assert adm.authors_cka(x, x) < 0.9 and abs(linear_cka(x, x) - 1.0) < 1e-12
    # the Gram form the bootstrap uses gives both, on the rows and on a resample with repeated rows
    for rows in (np.arange(12), np.array([0, 0, 3, 5, 5, 5, 7, 8, 11, 2, 2, 9])):
        kx, ky = x @ x.T, y @ y.T
        sub = np.ix_(rows, rows)
        assert abs(adm.similarity_from_grams(kx[sub], ky[sub], "authors") - _loop_authors(x[rows].tolist(),
                                                                                          y[rows].tolist())) < 1e-10
        assert abs(adm.similarity_from_grams(kx[sub], ky[sub], "linear_cka") - linear_cka(x[rows], y[rows])) < 1e-10


def test_pooling_against_plain_loops():
    rng = np.random.default_rng(4)
    states = rng.normal(size=(3, 6, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    content = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], bool)
    out = adm.pool(states, mask, content)
    for b in range(3):
        for j in range(4):
            every = [float(states[b, t, j]) for t in range(6)]
            real = [float(states[b, t, j]) for t in range(6) if mask[b, t]]
            cont = [float(states[b, t, j]) for t in range(6) if content[b, t]]
            assert abs(out["all_positions"][b, j] - sum(every) / 6) < 1e-6  # padding included, as the authors'
            assert abs(out["real_tokens"][b, j] - sum(real) / len(real)) < 1e-6
            assert abs(out["content_tokens"][b, j] - sum(cont) / len(cont)) < 1e-6
