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
    # the p95 only where every point has the samples for it; else the max, labelled as such
    p95_ok = all(r["stats"]["latency"]["supported"]["p95"] for r in rows if "stats" in r)
    tail_key, tail_label = (("latency_p95_s", "p95 request latency (s)") if p95_ok else
                            ("latency_max_s", "max request latency (s; too few samples for a p95)"))
    for fname, key, lo, hi, ylabel in (
            ("serve_throughput.png", "tokens_per_second", "tokens_per_second_min", "tokens_per_second_max",
             "output tokens / s (median, min-max)"),
            ("serve_latency_p95.png", tail_key, None, None, tail_label)):
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
    open_rows = report["summary"].get("open_loop") or []
    if open_rows:
        ok = all(r["stats"]["latency"]["supported"]["p95"] for r in open_rows)
        key, label = (("latency_p95_s", "p95 request latency (s)") if ok else
                      ("latency_max_s", "max request latency (s; too few samples for a p95)"))
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for c in dict.fromkeys(r["config"] for r in open_rows):
            rs = sorted((r for r in open_rows if r["config"] == c), key=lambda r: r["offered_rate"])
            style = "-" if c.startswith("merged") else ("--" if c.startswith("unmerged") else ":")
            ax.plot([r["offered_rate"] for r in rs], [r[key] for r in rs], style, marker="o", label=c)
            sat = [r for r in rs if r["saturated"]]
            if sat:
                ax.scatter([r["offered_rate"] for r in sat], [r[key] for r in sat], marker="x", s=80, color="k",
                           zorder=3)
        ax.set_xlabel("offered load (requests / s, Poisson arrivals); x: the engine did not keep up")
        ax.set_ylabel(label)
        ax.set_title(f"{engine}: open loop, latency against offered load")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _save(fig, out_dir / "serve_open_loop.png")
        plt.close(fig)
        written.append("serve_open_loop.png")
    mem = report["summary"]["memory"]
    names = [k for k, v in mem.items() if isinstance(v, dict) and "peak_rss_mib" in v]
    if names:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        peaks = [mem[n].get("peak_pss_mib") or mem[n]["peak_rss_mib"] for n in names]
        kv = [mem[n]["kv_cache_reserved_mib"] for n in names]
        ax.bar(names, peaks, label="peak PSS over the run (engine process tree)")
        ax.bar(names, kv, width=0.4, label="of which KV-cache reservation", alpha=0.7)
        if "merged_alternative_mib" in mem:
            ax.axhline(mem["merged_alternative_mib"], color="k", ls="--", lw=1,
                       label="merged alternative: one more copy of the weights (+ KV) per task")
        ax.set_ylabel("MiB")
        ax.set_title(f"{engine}: memory per configuration")
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=8)
        _save(fig, out_dir / "serve_memory.png")
        plt.close(fig)
        written.append("serve_memory.png")
    return written
