"""Figures of the serving benchmark (matplotlib, Agg backend, imported when called)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorascope.drift.plots import _pyplot, _save


def plot_serve(report: dict[str, Any], out_dir: Path) -> list[str]:
    """serve_throughput.png, serve_latency_p95.png (one line per configuration) and serve_memory.png."""
    plt = _pyplot()
    rows = report["summary"]["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    engine = report["settings"]["engine"]
    written = []
    for fname, key, lo, hi, ylabel in (
            ("serve_throughput.png", "tokens_per_second", "tokens_per_second_min", "tokens_per_second_max",
             "output tokens / s (median, min-max)"),
            ("serve_latency_p95.png", "latency_p95_s", None, None, "p95 request latency (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for c in configs:
            rs = sorted((r for r in rows if r["config"] == c), key=lambda r: r["batch_size"])
            xs = [r["batch_size"] for r in rs]
            style = "-" if c.startswith("merged") else ("--" if c.startswith("unmerged") else ":")
            line, = ax.plot(xs, [r[key] for r in rs], style, marker="o", label=c)
            if lo:
                ax.fill_between(xs, [r[lo] for r in rs], [r[hi] for r in rs], color=line.get_color(), alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch_size"] for r in rows}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{engine}: merged vs unmerged LoRA adapters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out_dir / fname)
        plt.close(fig)
        written.append(fname)
    mem = report["summary"]["memory"]
    names = [k for k, v in mem.items() if isinstance(v, dict)]
    if names:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        peaks = [mem[n]["peak_rss_mb"] for n in names]
        kv = [mem[n]["kv_cache_reserved_mb"] for n in names]
        ax.bar(names, peaks, label="peak resident memory (engine processes)")
        ax.bar(names, kv, width=0.4, label="of which KV-cache reservation", alpha=0.7)
        if "merged_alternative_for_all_tasks_mb" in mem:
            ax.axhline(mem["merged_alternative_for_all_tasks_mb"], color="k", ls="--", lw=1,
                       label="merged alternative: one engine per task")
        ax.set_ylabel("MiB")
        ax.set_title(f"{engine}: memory per configuration")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=8)
        _save(fig, out_dir / "serve_memory.png")
        plt.close(fig)
        written.append("serve_memory.png")
    return written
