"""Figures of the drift and weights stages (matplotlib, Agg backend, imported when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorascope.runinfo import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_drift(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """cka_vs_layer.png and cosine_vs_layer.png: base vs each tuned model, with 95% interval bands."""
    plt = _pyplot()
    base_pairs = [(k, v) for k, v in result["pairs"].items() if v["reference"] == "base"]
    x = list(range(len(result["layers"])))
    ticks = x if len(x) <= 12 else x[::max(1, len(x) // 10)]
    labels = ["emb" if i == 0 else str(i - 1) for i in ticks]
    note = "last state is before the final norm"
    written = []
    specs = [("cka_vs_layer.png", [("token_cka", "value", "-", "token-level"),
                                   ("example_cka", "value", "--", "example-level (mean-pooled)")],
              "linear CKA with the base model"),
             ("cosine_vs_layer.png", [("cosine", "mean", "-", "mean over tokens")],
              "cosine similarity with the base model")]
    for fname, series, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (_pair, d) in enumerate(base_pairs):
            color = f"C{i}"
            for key, field, style, what in series:
                y = [r[key][field] for r in d["layers"]]
                lo = [r[key]["ci_low"] for r in d["layers"]]
                hi = [r[key]["ci_high"] for r in d["layers"]]
                ax.plot(x, [float("nan") if v is None else v for v in y], style, color=color, marker=".",
                        label=f"{d['other']} ({what})" if len(series) > 1 else d["other"])
                if all(v is not None for v in lo + hi):
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("layer state (emb = embedding output)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{result['config']['task']}: {result['n_examples']} prompts, "
                     f"{result['n_tokens']} tokens; bands: 95% jackknife\n({note})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out_dir / fname)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def plot_spectra(spectra: dict[str, dict[str, dict[int, list[float]]]], path: Path) -> Path:
    """Singular values of the updates dW (normalised by the largest) for a few layers per module type.

    `spectra` maps tuned name -> module type -> layer -> singular values (descending).
    """
    plt = _pyplot()
    mtypes = sorted({t for per in spectra.values() for t in per})
    cols = min(4, max(1, len(mtypes)))
    rows = (len(mtypes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, mt in zip(axes.ravel(), mtypes):
        for i, (name, per) in enumerate(spectra.items()):
            for j, (layer, s) in enumerate(sorted(per.get(mt, {}).items())):
                if not s or s[0] <= 0:
                    continue
                ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], styles[j % len(styles)], color=f"C{i}",
                            label=f"{name} L{layer}")
        ax.set_title(mt, fontsize=9)
        ax.set_xlabel("index", fontsize=8)
        ax.set_ylabel("sigma_i / sigma_1", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(mtypes):]:
        ax.axis("off")
    fig.suptitle("singular values of the weight updates dW", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_diagnostics(result: dict[str, Any], path: Path) -> Path:
    """Per layer: share of the centred Gram energy by token kind, and the top feature's variance share."""
    plt = _pyplot()
    diag = result["diagnostics"]
    rows = diag["layers"]
    x = list(range(len(rows)))
    labels = ["emb" if i == 0 else str(i - 1) for i in x]
    ticks = x if len(x) <= 12 else x[::max(1, len(x) // 10)]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, kind in enumerate(("first_position", "template", "content")):
        y = [r["gram_energy_share"][kind] for r in rows]
        a1.plot(x, [float("nan") if v is None else v for v in y], marker=".", color=f"C{i}",
                label=f"{kind.replace('_', ' ')} ({rows[0]['token_share'][kind]:.1%} of tokens)")
    a1.set_ylim(-0.02, 1.02)
    a1.set_ylabel("share of centred Gram energy ||K||_F^2")
    a1.set_title("which tokens carry the Gram energy (base model)", fontsize=9)
    for key, style, what in (("top_dims_all", "-", "all tokens"), ("top_dims_content", "--", "content tokens")):
        y = [r[key][0][1] if r[key] else float("nan") for r in rows]
        a2.plot(x, y, style, marker=".", color="C3", label=f"largest feature, {what}")
        y5 = [sum(s for _, s in r[key]) if r[key] else float("nan") for r in rows]
        a2.plot(x, y5, style, marker=".", color="C4", label=f"top {diag['top_dims']} features, {what}")
    a2.set_ylim(-0.02, 1.02)
    a2.set_ylabel("share of the total feature variance")
    a2.set_title("how few feature dimensions hold the variance", fontsize=9)
    for ax in (a1, a2):
        ax.set_xticks(ticks, [labels[t] for t in ticks])
        ax.set_xlabel("layer state (emb = embedding output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['config']['task']}: drift diagnostics on {diag['n_examples']} prompts, all tokens",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_ratio_by_layer(result: dict[str, Any], path: Path) -> Path | None:
    """Per layer, the drift ratio LoRA / full of every measure (first LoRA-full checkpoint pair)."""
    ratios = result["summary"].get("ratios") or []
    if not ratios:
        return None
    plt = _pyplot()
    entry = ratios[0]
    x = list(range(len(result["layers"])))
    ticks = x if len(x) <= 12 else x[::max(1, len(x) // 10)]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for i, key in enumerate(result["summary"]["measures"]):
        rows = entry["per_layer"][key]
        y = [float("nan") if r["value"] is None else r["value"] for r in rows]
        ax.plot(x, y, "-" if key == result["summary"]["primary"] else "--", marker=".", color=f"C{i}",
                linewidth=2.2 if key == result["summary"]["primary"] else 1.0, label=key)
    crit = 1.0 - result["config"].get("reduction", 0.2)
    ax.axhline(crit, color="k", linestyle=":", linewidth=1, label=f"criterion 2a ({crit:g})")
    ax.set_xticks(ticks, ["emb" if t == 0 else str(t - 1) for t in ticks])
    ax.set_xlabel("layer state (emb = embedding output)")
    ax.set_ylabel(f"drift ratio {entry['lora']} / {entry['full']}")
    ax.set_title(f"{result['config']['task']}: per-layer drift ratio by measure ({result['n_examples']} prompts, "
                 f"{result['selection']['tokens']} tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return path
