"""Criterion 2a on the reference study's seed-0 MRPC models so far: their drift runs (one model each, against the
base model) pooled by lorascope.drift.measure.combine_drift, the function the study's drift:mrpc stage calls once
every seed has run. One seed per method: the intervals cover prompt sampling only. Usage:
python interim_drift.py ARCHIVE OUT (ARCHIVE: the archive/ folder here, or a run folder)"""
import json
import sys
from pathlib import Path

from lorascope.drift.measure import combine_drift

parts = Path(sys.argv[1]) / "drift-models" / "mrpc"
r = combine_drift({n: parts / n for n in ("full_s0", "lora_r8_s0")}, sys.argv[2], plots=False)
s = r["summary"]
out = {"n_prompts": r["n_examples"], "n_tokens": r["n_tokens"],
       "drift": {n: {k: pm[k] for k in pm if k.endswith("_drift")} for n, pm in s["per_model"].items()},
       "ratio_lora_over_full": {k: v for k, v in s["method_ratios"][0].items() if isinstance(v, dict) and "value" in v},
       "criterion_2a": {k: s["criterion_2a"][0][k] for k in ("status", "reason")}}
print(json.dumps(out, indent=1))
