"""Serving benchmark: LoRA adapters merged into the weights vs kept separate, per batch size.

vLLM (or transformers `generate`, the embedded reference backend) runs in a separate process
per configuration; see `lorascope.serve.bench`. vLLM is imported only inside the worker.
"""

from lorascope.serve.bench import ServeSettings, run_serve_bench

__all__ = ["ServeSettings", "run_serve_bench"]
