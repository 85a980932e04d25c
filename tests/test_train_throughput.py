"""benchmarks/train_throughput.py's ratio intervals, checked against plain loops."""

import importlib.util
import random
import statistics
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "train_throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py")
tt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tt)


def _windows(rng, n, rate, noise):
    return [{"tokens": (t := rng.randint(1400, 2000)), "seconds": t / (rate * (1 + rng.uniform(-noise, noise)))}
            for _ in range(n)]


def test_point_values_equal_plain_loops():
    rng = random.Random(3)
    a, b = _windows(rng, 12, 300.0, 0.2), _windows(rng, 12, 220.0, 0.2)
    for w, v in zip(b, a):  # same batch in a round: the same tokens for both arms
        w["tokens"] = v["tokens"]
    r = tt.ratio_intervals(a, b, resamples=2000)
    per_round = []
    for x, y in zip(a, b):
        per_round.append((x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]))
    assert r["median"] == pytest.approx(statistics.median(per_round), rel=1e-12)
    assert (r["min"], r["max"]) == (pytest.approx(min(per_round)), pytest.approx(max(per_round)))
    tok_a = sec_a = tok_b = sec_b = 0.0
    for x, y in zip(a, b):
        tok_a += x["tokens"]
        sec_a += x["seconds"]
        tok_b += y["tokens"]
        sec_b += y["seconds"]
    assert r["overall"] == pytest.approx((tok_a / sec_a) / (tok_b / sec_b), rel=1e-12)
    for key, point in (("median_ci95", r["median"]), ("overall_ci95", r["overall"])):
        lo, hi = r[key]
        assert min(per_round) <= lo < point < hi <= max(per_round)


def test_interval_reflects_the_spread_of_rounds():
    rng = random.Random(0)
    steady = _windows(rng, 10, 300.0, 0.0)
    base = [{"tokens": w["tokens"], "seconds": w["tokens"] / 200.0} for w in steady]
    r = tt.ratio_intervals(steady, base, resamples=500)
    assert r["median_ci95"] == pytest.approx([1.5, 1.5]) and r["overall_ci95"] == pytest.approx([1.5, 1.5])
    noisy = _windows(random.Random(1), 10, 300.0, 0.3)
    base = [{"tokens": w["tokens"], "seconds": w["tokens"] / 200.0} for w in noisy]
    lo, hi = tt.ratio_intervals(noisy, base, resamples=500)["overall_ci95"]
    assert hi - lo > 0.05 and lo < 1.5 < hi


def test_bootstrap_is_a_resampling_of_rounds_with_replacement():
    # a plain-loop bootstrap with the same generator draws gives the same interval
    import numpy as np

    rng = random.Random(7)
    a, b = _windows(rng, 6, 300.0, 0.25), _windows(rng, 6, 210.0, 0.25)
    r = tt.ratio_intervals(a, b, resamples=300, seed=5)
    idx = np.random.default_rng(5).integers(0, 6, size=(300, 6))
    rate = [(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"]) for x, y in zip(a, b)]
    meds = []
    for row in idx:
        meds.append(statistics.median(rate[i] for i in row))
    assert r["median_ci95"] == pytest.approx(list(np.percentile(meds, [2.5, 97.5])), rel=1e-12)
