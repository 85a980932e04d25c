"""Criterion 2a (LoRA drifts at least 20 % less than full fine-tuning), judged over several measures.

A pure function of one entry of ``drift.json``'s ``summary.method_ratios``: no file, no model.

Rules (threshold t = 1 - reduction, 0.8 for the proposal's 20 %):

- PASS: the primary measure's ratio has its whole 95 % interval at or below t, every
  other measure's ratio is at or below t (they agree), and, when seeds give a noise floor,
  the difference between the methods' drifts exceeds the seed-to-seed drift.
- FAIL: the primary ratio's whole interval is above t and no other measure is at or
  below t.
- INCONCLUSIVE otherwise, with the reason: which measures disagree, an interval that
  straddles t, a difference within seed noise, or a ratio that cannot be computed.

With one seed per method the intervals cover prompt sampling only; the reason says so.
"""

from __future__ import annotations

from typing import Any

LABELS = {"token_cka": "content-token linear CKA", "token_cka_std": "CKA of standardised features",
          "example_cka": "example-level CKA", "example_cka_debiased": "example-level CKA (debiased)",
          "cosine": "1 - cosine", "relative_change": "relative change"}


def judge_drift(entry: dict[str, Any], *, threshold: float = 0.8, primary: str = "token_cka",
                measures: list[str] | None = None, tokens: str = "content") -> dict[str, Any]:
    """Status PASS / FAIL / INCONCLUSIVE of criterion 2a for one LoRA method against one full method.

    Parameters
    ----------
    entry : one ``summary.method_ratios`` item: ``{measure: {"value", "ci_low", "ci_high", ...},
        "lora", "full", "noise_floor": {method: {measure: {"value", ...}}}, ...}``.
    threshold : the largest ratio LoRA / full that meets the criterion.
    primary : the measure whose interval decides.
    measures : the measures to report (default: every measure in `entry` that LABELS knows).
    tokens : the tokens the measures were computed on (``content`` or ``all``), named in the labels.

    Returns
    -------
    dict with ``status``, ``reason``, ``next`` (what more measurement could decide an INCONCLUSIVE: more
    seeds or prompts, whichever the primary interval's width comes from; None for PASS, FAIL, measures that
    disagree, and a difference below the whole interval of the seed noise floor), ``without_floor`` (where
    the noise floor decided: ``{"status", "reason"}`` of the interval and the measures on their own),
    ``primary``, ``threshold`` and ``rows`` (one per measure:
    ``measure``, ``label``, ``ratio``, ``ci_low``, ``ci_high``, ``meets`` (ratio <= threshold),
    ``confident`` (ci_high <= threshold), ``fails`` (ci_low > threshold)).
    """
    measures = measures or [k for k in LABELS if k in entry]
    if primary not in measures:
        raise ValueError(f"primary measure {primary!r} is not among {measures}")
    rows = []
    for key in measures:
        r = entry.get(key) or {}
        v, lo, hi = r.get("value"), r.get("ci_low"), r.get("ci_high")
        label = LABELS.get(key, key)
        if tokens != "content":
            label = label.replace("content-token", f"{tokens}-token")
        rows.append({"measure": key, "label": label, "ratio": v, "ci_low": lo, "ci_high": hi,
                     "meets": None if v is None else v <= threshold,
                     "confident": None if hi is None else hi <= threshold,
                     "fails": None if lo is None else lo > threshold})
    row = {r["measure"]: r for r in rows}
    p = row[primary]
    others = [r for r in rows if r["measure"] != primary]
    out = {"lora": entry.get("lora"), "full": entry.get("full"), "primary": primary, "threshold": threshold,
           "rows": rows}
    seeds_note = ""
    if not (entry.get(primary) or {}).get("seed_variance_included", False):
        seeds_note = " (one seed per method: the intervals cover prompt sampling only, not training seeds)"
    else:  # seeds, but a method whose seeds were never measured against each other has no noise floor
        seeds = {entry.get("lora"): entry.get("lora_seeds") or [], entry.get("full"): entry.get("full_seeds") or []}
        floors = entry.get("noise_floor") or {}
        unmeasured = [m for m, members in seeds.items() if len(members) > 1 and m not in floors]
        if unmeasured:
            seeds_note = (f" (no seed noise floor for {' and '.join(unmeasured)}: no two of its seeds were measured "
                          f"against each other)")

    pe = entry.get(primary) or {}
    if pe.get("seed_variance_included") and (pe.get("se_seeds") or 0.0) > (pe.get("se_prompts") or 0.0):
        # the interval is wider from seeds than from prompts: more prompts would hardly narrow it
        more = (f"more seeds (train.seed; the ratio's standard error is {pe['se_seeds']:.3f} from seeds, "
                f"{pe.get('se_prompts') or 0.0:.3f} from prompts)")
    else:
        more = "more drift prompts (study.drift.max_examples)"

    def done(status: str, reason: str, next_: str | None = None) -> dict[str, Any]:
        """`next_`: what more measurement could decide an INCONCLUSIVE; None where more of the same cannot."""
        out.update(status=status, reason=reason + seeds_note, next=next_)
        return out

    def by_interval() -> tuple[str, str, str | None]:
        """The judgement from the primary interval and the other measures alone, without the noise floor."""
        digits = 3 if threshold in (round(p["ci_low"], 2), round(p["ci_high"], 2)) else 2  # 0.803 is not "0.80"
        span = f"{p['ratio']:.{digits}f} [{p['ci_low']:.{digits}f}, {p['ci_high']:.{digits}f}]"
        if p["confident"]:
            against = [r for r in others if r["meets"] is not True]
            if not against:
                return "PASS", (f"{p['label']} ratio {span} <= {threshold:g}, and every other measure agrees ("
                                + ", ".join(f"{r['label']} {r['ratio']:.2f}" for r in others) + ")"), None
            return "INCONCLUSIVE", (f"{p['label']} ratio {span} <= {threshold:g}, but the measures disagree: "
                                    + ", ".join(f"{r['label']} {_f(r['ratio'])}" for r in against)
                                    + f" not <= {threshold:g}"), None
        if p["fails"]:
            against = [r for r in others if r["meets"] is True]
            if not against:
                return "FAIL", (f"{p['label']} ratio {span} > {threshold:g}, and no other measure is "
                                f"<= {threshold:g}"), None
            return "INCONCLUSIVE", (f"{p['label']} ratio {span} > {threshold:g}, but the measures disagree: "
                                    + ", ".join(f"{r['label']} {r['ratio']:.2f}" for r in against)
                                    + f" <= {threshold:g}"), None
        reason = f"{p['label']} ratio {span}: the interval straddles {threshold:g}"
        against = [r for r in others if r["meets"] is not None and r["meets"] != p["meets"]]
        if against:  # more prompts or seeds could narrow the interval, but these measures would still disagree
            reason += ("; the measures disagree too: " + ", ".join(f"{r['label']} {r['ratio']:.2f}" for r in against)
                       + f" {'not ' if p['meets'] else ''}<= {threshold:g}")
            return "INCONCLUSIVE", reason, None  # narrowing the interval would leave them disagreeing
        return "INCONCLUSIVE", reason, more

    if p["ratio"] is None:
        return done("INCONCLUSIVE", f"the {p['label']} ratio cannot be computed "
                                    f"({(entry.get(primary) or {}).get('note', 'no value')})", more)
    if p["ci_low"] is None:
        return done("INCONCLUSIVE", f"the {p['label']} ratio {p['ratio']:.2f} has no interval", more)
    noise = entry.get("noise_floor") or {}
    floors = {m: (d.get(primary) or {}).get("value") for m, d in noise.items()}
    floors = {m: v for m, v in floors.items() if v is not None}
    if floors:
        diff = abs(
            (entry.get(primary) or {}).get("full_drift", 0.0) - (entry.get(primary) or {}).get("lora_drift", 0.0)
        )
        worst = max(floors, key=floors.get)
        if diff <= floors[worst]:
            floor = noise[worst].get(primary) or {}
            lo, hi = floor.get("ci_low"), floor.get("ci_high")
            ci = f" [{lo:.3g}, {hi:.3g}]" if lo is not None and hi is not None else ""
            pairs = noise[worst].get("pairs")
            on = f"; {pairs} seed pair(s), interval over prompts" if pairs and ci else ""
            # below the floor's whole interval: more prompts cannot lift the difference above it
            clear = lo is not None and diff < lo
            # drifts are >= 0, so the difference can never exceed the larger of the two methods' drifts: a floor
            # above that cannot be cleared by any drift of the other method (its seeds move apart, not along one
            # direction), and the reader should know the INCONCLUSIVE is structural, not a near miss
            own = max(("full", "lora"), key=lambda k: pe.get(f"{k}_drift") or 0.0)
            top = pe.get(f"{own}_drift")
            beyond = (f"; the floor is above {entry.get(own, own)}'s own mean drift from the base model ({top:.3g}), "
                      f"so no drift of the other method, not even 0, could make the difference larger than it"
                      if top is not None and (lo if lo is not None else floors[worst]) > top else "")
            # what the interval and the measures say on their own, so the reader sees whether the floor is
            # the only thing that keeps (2a) from a PASS or a FAIL
            alone, alone_reason, _ = by_interval()
            out["without_floor"] = {"status": alone, "reason": alone_reason}
            return done("INCONCLUSIVE", f"the difference between the methods' {p['label']} drifts ({diff:.3g}) is not "
                                        f"larger than the drift between two seeds of {worst} ({floors[worst]:.3g}"
                                        f"{ci}{on}): not a finding"
                        + ("; more prompts would not change that" if clear else "") + beyond,
                        None if clear or beyond else more)
    status, reason, next_ = by_interval()
    return done(status, reason, next_)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def criterion_from_drift(drift: dict[str, Any], lora: str, full: str) -> dict[str, Any] | None:
    """Criterion 2a for the LoRA method `lora` (e.g. 'lora_r8') against `full` from a drift.json.

    Returns the judgement (see :func:`judge_drift`) with the primary ratio and drifts under
    the keys the report uses (``ratio``, ``ci_low``, ``ci_high``, ``lora``, ``full``, ``pass``),
    or None when the file holds no such comparison (e.g. an older drift.json).
    """
    summary = drift.get("summary", {})
    for c, m in zip(summary.get("criterion_2a", []), summary.get("method_ratios", [])):
        if c["lora"] == lora and c["full"] == full:
            primary = m[c["primary"]]
            return {**c, "ratio": primary["value"], "ci_low": primary["ci_low"], "ci_high": primary["ci_high"],
                    "lora_drift": primary["lora_drift"], "full_drift": primary["full_drift"],
                    "lora": primary["lora_drift"], "full": primary["full_drift"], "lora_method": lora,
                    "full_method": full, "pass": c["status"] == "PASS", "confident": c["status"] == "PASS"}
    return None
