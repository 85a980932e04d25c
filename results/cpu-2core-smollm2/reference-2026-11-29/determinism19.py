"""Compare MRPC lora_r8_s0 retrained in session 18-19 with session 17's archived copy: losses and predictions.

Run in session 19, when the folder was reference-2026-11-29-partial and archive/ was still session 18's
(git show 0dbe4d5:results/cpu-2core-smollm2/reference-2026-11-29-partial/archive/...). Since 4060eca,
archive/ holds the retrained run itself, so to repeat the check point A at a checkout of 0dbe4d5.
"""
import json
A = "/work/main/results/cpu-2core-smollm2/reference-2026-11-29-partial/archive"
old = [json.loads(x) for x in open(f"{A}/train/mrpc/lora_r8_s0/metrics.jsonl")]
new = [json.loads(x) for x in open("/work/ref/train/mrpc/lora_r8_s0/metrics.jsonl")]
o = {r["step"]: r for r in old if "loss" in r}
n = {r["step"]: r for r in new if "loss" in r}
common = sorted(set(o) & set(n))
same = [s for s in common if o[s]["loss"] == n[s]["loss"] and o[s].get("grad_norm") == n[s].get("grad_norm")]
print(f"logged steps in both: {len(common)}; identical loss and grad norm: {len(same)}")
diff = [s for s in common if s not in same]
if diff:
    print("first differing:", diff[:5], [(o[s]["loss"], n[s]["loss"]) for s in diff[:3]])
try:
    po = json.load(open(f"{A}/eval/mrpc/lora_r8_s0.predictions.json"))
    pn = json.load(open("/work/ref/eval/mrpc/lora_r8_s0.predictions.json"))
    keys = sorted(set(po) & set(pn))
    print(f"predictions: {len(po)} archived, {len(pn)} new, {sum(po[k] == pn[k] for k in keys)} of {len(keys)} identical "
          f"records; largest |difference| of log p(yes), log p(no): "
          f"{max(abs(po[k]['logp_yes'] - pn[k]['logp_yes']) for k in keys)}, "
          f"{max(abs(po[k]['logp_no'] - pn[k]['logp_no']) for k in keys)}")
except FileNotFoundError as e:
    print("no predictions yet:", e)
