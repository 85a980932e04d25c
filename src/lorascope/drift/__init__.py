"""Drift: how far fine-tuning moves a model, in activation space and in weight space.

Two stages, each one function that the command line calls:

- :func:`run_drift` (``lorascope drift``) runs the base model and any number of tuned
  checkpoints (full model directories or PEFT adapters) in lockstep over held-out
  prompts and compares the hidden states of every pair, layer by layer, on the
  examples' own content tokens (never position 0 or template tokens, by default):
  token-level linear CKA (exact, streaming; the primary), CKA of standardised features,
  example-level CKA of mean-pooled states (biased and debiased), 1 - cosine and relative
  change of each token's state, each with a 95 % jackknife interval; drift per measure
  averaged over layers, LoRA / full ratios (seed variance included with several seeds),
  seed noise floors, criterion 2a (:mod:`~lorascope.drift.criterion`) and Gram-energy
  diagnostics (:mod:`~lorascope.drift.diagnostics`).
- :func:`run_drift_along` (``lorascope drift-along``): drift and validation metric at the
  snapshots saved during training.
- :func:`run_weights` (``lorascope weights``) analyses the weight updates dW of every
  adapted matrix: norms, effective and stable rank, energy in the top singular values,
  and intruder dimensions (Shuttleworth et al., 2024).

Modules: ``capture`` (forward hooks, batches, lockstep forward passes), ``stats``
(jackknife intervals, histogram quantiles, example-level CKA downdates; pure arrays),
``measure`` (the drift stage), ``weights`` (the weight stage), ``plots``. The similarity
maths itself is :mod:`lorascope.similarity`.
"""

from lorascope.drift.along import run_drift_along
from lorascope.drift.criterion import judge_drift
from lorascope.drift.measure import parse_tuned, run_drift
from lorascope.drift.weights import run_weights

__all__ = ["judge_drift", "parse_tuned", "run_drift", "run_drift_along", "run_weights"]
