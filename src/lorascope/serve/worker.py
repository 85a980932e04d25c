"""One engine configuration, in a long-lived process of its own.

`python -m lorascope.serve.worker SPEC.json REPLY_FD` builds one engine (vLLM or
transformers) for one serving mode, generates the correctness-check batch and answers
"ready" on the pipe REPLY_FD; then it runs each batch the parent sends on stdin (one JSON
line: {"cmd": "run", "items": [...]}) and answers with every request's timings, until
{"cmd": "close"}. The parent (`lorascope.serve.bench`) keeps one such process per
configuration alive and alternates between them round by round, so the arms are measured
interleaved in time, memory figures are those of one engine alone, and a failing
configuration cannot take the others down.

SPEC fields: engine, mode, model (the directory the engine loads), adapters ([{name,
path, int_id, rank}], empty for merged), check_items ([{key, adapter, prompt_ids}]),
output_tokens, ignore_eos, engine_args (vLLM), dtype, check_base (also generate the
check items without any adapter, in batches of their own), force_adapter_names
(transformers, one adapter: take PEFT's mixed-batch path anyway, to measure what it costs).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lorascope.lm import pad_batch


class MemorySampler:
    """Peak resident memory of this process and all its descendants (engine workers included)."""

    def __init__(self, interval: float = 0.05, pss_interval: float = 5.0):
        self.interval = interval
        self.pss_interval = pss_interval
        self._pss_at = 0.0
        self.peak = 0
        self.peak_pss = 0
        self.last_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak

    def sample(self, pss: bool = False) -> int:
        """RSS of the process tree now (cheap: /proc/PID/status), and PSS (smaps_rollup: tens of ms for a
        large process, so not every 50 ms) when asked, when the RSS reaches a new peak, or every
        `pss_interval` seconds; the peaks are kept over the whole run."""
        pid = os.getpid()
        now = tree_rss_bytes(pid)
        t = time.monotonic()
        if pss or now > self.peak or t - self._pss_at >= self.pss_interval:
            p = tree_memory_bytes(pid)[1]
            self._pss_at = t
            self.last_pss = p
            self.peak_pss = max(self.peak_pss, p)
        self.peak = max(self.peak, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    out += [int(c) for c in fh.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident set size of `pid` and its descendants, from /proc (Linux); 0 elsewhere."""
    return tree_memory_bytes(pid, pss=False)[0]


def _pss(pid: int) -> int:
    """Proportional set size (shared pages divided among their users) from smaps_rollup; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory_bytes(pid: int, pss: bool = True) -> tuple[int, int]:
    """(RSS summed, PSS summed) over `pid` and its descendants, from /proc (Linux); zeros elsewhere.

    The RSS sum counts pages shared between the processes once per process; the PSS sum counts
    each page once in all."""
    total, pss_total, stack, seen = 0, 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
        if pss:
            pss_total += _pss(p)
        stack += _children(p)
    return total, pss_total


def device_used_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return int(total - free)
    except Exception:  # no torch CUDA: not a GPU run
        return None
    return None


# ---------------------------------------------------------------------------------------
# engines: each exposes run(items) -> list of per-request records, in item order


class VllmEngine:
    def __init__(self, spec: dict[str, Any]):
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise SystemExit(f"vLLM is not installed ({exc}); install the extra: pip install 'lorascope[serve-cpu]' "
                             f"on CPU machines, 'lorascope[serve-gpu]' on GPU machines") from None
        args = dict(spec["engine_args"])
        if spec["adapters"]:
            args.update(enable_lora=True, max_loras=len(spec["adapters"]), max_lora_rank=spec["max_lora_rank"],
                        max_cpu_loras=len(spec["adapters"]))
        if spec.get("profile"):
            # timers inside the engine process, called by name (lorascope/serve/vllm_timing.py)
            args["worker_extension_cls"] = "lorascope.serve.vllm_timing.LoraTimingExtension"
        self.llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype=spec["dtype"], seed=0,
                       trust_remote_code=False, **args)
        self.engine = self.llm.llm_engine
        self.params = SamplingParams(temperature=0.0, max_tokens=spec["output_tokens"],
                                     ignore_eos=spec["ignore_eos"])
        self._sampling = SamplingParams
        self.loras = {a["name"]: LoRARequest(a["name"], a["int_id"], a["path"]) for a in spec["adapters"]}
        self.settings = self._settings()
        self._n = 0

    def _settings(self) -> dict[str, Any]:
        cfg = self.engine.vllm_config
        out: dict[str, Any] = {"enforce_eager": cfg.model_config.enforce_eager,
                               "dtype": str(cfg.model_config.dtype),
                               "max_model_len": cfg.model_config.max_model_len,
                               "max_num_seqs": cfg.scheduler_config.max_num_seqs,
                               "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
                               "block_size": cfg.cache_config.block_size,
                               "num_kv_blocks": cfg.cache_config.num_gpu_blocks,
                               "compilation_mode": str(getattr(cfg.compilation_config, "mode", None)),
                               "cudagraph_mode": str(getattr(cfg.compilation_config, "cudagraph_mode", None)),
                               "tensor_parallel_size": cfg.parallel_config.tensor_parallel_size}
        if cfg.lora_config is not None:
            out.update(max_loras=cfg.lora_config.max_loras, max_lora_rank=cfg.lora_config.max_lora_rank)
        mc = cfg.model_config
        hf = mc.hf_text_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        bytes_per_token = 2 * hf.num_hidden_layers * kv_heads * head_dim * mc.dtype.itemsize
        blocks = cfg.cache_config.num_gpu_blocks or 0
        out["kv_cache_bytes_per_token"] = bytes_per_token
        out["kv_cache_reserved_bytes"] = int(blocks * cfg.cache_config.block_size * bytes_per_token)
        return out

    def run(self, items: list[dict[str, Any]], params=None) -> list[dict[str, Any]]:
        recs: dict[str, dict[str, Any]] = {}
        order = []
        t0 = time.perf_counter()
        for it in items:
            rid = f"r{self._n}"
            self._n += 1
            order.append(rid)
            recs[rid] = {"key": it["key"], "adapter": it["adapter"], "first": None, "done": None, "token_ids": []}
            self.engine.add_request(rid, {"prompt_token_ids": it["prompt_ids"]}, params or self.params,
                                    lora_request=self.loras.get(it["adapter"]) if it["adapter"] else None)
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            now = time.perf_counter() - t0
            for o in outs:
                r = recs.get(o.request_id)
                if r is None:
                    continue
                toks = list(o.outputs[0].token_ids) if o.outputs else []
                if toks and r["first"] is None:
                    r["first"] = now
                r["token_ids"] = toks
                if o.finished:
                    r["done"] = now
        return [recs[rid] for rid in order]

    def run_open(self, items: list[dict[str, Any]], arrivals: list[float]) -> list[dict[str, Any]]:
        """Open loop: request i is added once `arrivals[i]` seconds have passed (Poisson arrivals,
        continuous batching by the engine). Requests can only join between engine steps, so each
        record keeps its scheduled arrival and the time it was added; latencies count from the
        scheduled arrival, as a client would see them."""
        recs: dict[str, dict[str, Any]] = {}
        order = []
        t0 = time.perf_counter()
        i = 0
        while i < len(items) or self.engine.has_unfinished_requests():
            now = time.perf_counter() - t0
            while i < len(items) and arrivals[i] <= now:
                it = items[i]
                rid = f"r{self._n}"
                self._n += 1
                order.append(rid)
                recs[rid] = {"key": it["key"], "adapter": it["adapter"], "arrival": arrivals[i], "added": now,
                             "first": None, "done": None, "token_ids": []}
                self.engine.add_request(rid, {"prompt_token_ids": it["prompt_ids"]}, self.params,
                                        lora_request=self.loras.get(it["adapter"]) if it["adapter"] else None)
                i += 1
            if not self.engine.has_unfinished_requests():
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
                continue
            outs = self.engine.step()
            now = time.perf_counter() - t0
            for o in outs:
                r = recs.get(o.request_id)
                if r is None:
                    continue
                toks = list(o.outputs[0].token_ids) if o.outputs else []
                if toks and r["first"] is None:
                    r["first"] = now
                r["token_ids"] = toks
                if o.finished:
                    r["done"] = now
        return [recs[rid] for rid in order]

    def profile(self, items: list[dict[str, Any]], reps: int) -> dict[str, Any]:
        """Where the prefill and the first decode step of this batch spend their time, timed inside
        the engine process (`vllm_timing.LoraTimingExtension`): the base model's matrix products
        (every linear layer's quantisation method, the LM head included), vLLM's LoRA operations
        (its punica shrink/expand and add) and everything else of the forward passes (attention,
        norms, activations, embedding, the framework's glue); sampling and scheduling are outside.
        Each repetition generates 4 tokens per request. The engine process may start on the first
        requests before the last ones arrive, so the prefill is the first forward passes that together
        cover every prompt token (a pass that also decodes for an earlier request counts there: its
        pass and token counts are recorded), and the decode is the first later pass that decodes one
        token for every request of the batch. Of `reps` repetitions, the one with the median total."""
        counts = self.llm.collective_rpc("lorascope_timers_install")[0]
        params = self._sampling(temperature=0.0, max_tokens=4, ignore_eos=True)
        prompt_tokens = sum(len(it["prompt_ids"]) for it in items)
        phases: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}
        try:
            for _ in range(reps):
                self.llm.collective_rpc("lorascope_timers_take")
                self.run(items, params)
                passes = self.llm.collective_rpc("lorascope_timers_take")[0]
                n, covered = 0, 0
                while n < len(passes) and covered < prompt_tokens:
                    covered += passes[n]["tokens"]
                    n += 1
                decode = next((r for r in passes[n:] if r["tokens"] == len(items)), None)
                if covered < prompt_tokens or decode is None:
                    raise RuntimeError(f"profile: expected passes covering the {prompt_tokens} prompt tokens, then a "
                                       f"decode pass of {len(items)} tokens; the engine ran passes of "
                                       f"{[r['tokens'] for r in passes]} tokens")
                for phase, recs in {"prefill": passes[:n], "decode": [decode]}.items():
                    total = sum(r["total"] for r in recs)
                    base = sum(r["base"] for r in recs)
                    lora = sum(r["lora"] for r in recs)
                    phases[phase].append({"total": total, "base_matmul": base, "lora": lora,
                                          "other": total - base - lora, "passes": len(recs),
                                          "tokens": sum(r["tokens"] for r in recs)})
        finally:
            self.llm.collective_rpc("lorascope_timers_remove")
        if any(it["adapter"] for it in items) and not any(r["lora"] > 0 for r in phases["decode"]):
            raise RuntimeError(f"profile: no time recorded in vLLM's LoRA layers ({counts['lora']} wrapped) for a "
                               f"batch with adapters; the engine bypassed the timers (compiled graphs?)")
        return {phase: sorted(recs, key=lambda r: r["total"])[(len(recs) - 1) // 2] | {"reps": len(recs)}
                for phase, recs in phases.items()}

    def close(self) -> None:
        del self.llm


class TransformersEngine:
    """transformers `generate` (+ PEFT for unmerged adapters).

    One adapter: PEFT's plain path (the active adapter, no `adapter_names`), as a single-task
    deployment runs it; base-model requests go through `disable_adapter()` in batches of their
    own. Several adapters (multi): per-request adapters via `adapter_names` (PEFT's mixed-batch
    path)."""

    def __init__(self, spec: dict[str, Any]):
        import torch

        from lorascope.models import load_model, load_tokenizer

        self.torch = torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(spec["model"], dtype=dtype)
        self.tok = load_tokenizer(spec["model"])
        self.adapters = [a["name"] for a in spec["adapters"]]
        self.mixed_path = len(self.adapters) > 1 or (bool(self.adapters) and bool(spec.get("force_adapter_names")))
        if spec["adapters"]:
            from peft import PeftModel

            first, *rest = spec["adapters"]
            model = PeftModel.from_pretrained(model, first["path"], adapter_name=first["name"], is_trainable=False)
            for a in rest:
                model.load_adapter(a["path"], adapter_name=a["name"], is_trainable=False)
        self.model = model.to(self.device).eval()
        self.output_tokens = spec["output_tokens"]
        self.ignore_eos = spec["ignore_eos"]
        self.settings = {"dtype": spec["dtype"], "device": self.device, "torch_threads": torch.get_num_threads(),
                         "adapters_loaded": self.adapters, "kv_cache_reserved_bytes": 0,
                         "peft_path": ("mixed-batch (adapter_names)" if self.mixed_path else
                                       "single adapter (no adapter_names)" if self.adapters else "none (merged)")}

    def run(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        torch = self.torch
        tok = self.tok
        ids, mask = pad_batch([it["prompt_ids"] for it in items], tok.pad_token_id, side="left", device=self.device)
        kwargs: dict[str, Any] = {}
        import contextlib

        ctx: Any = contextlib.nullcontext()
        names = {it["adapter"] for it in items}
        if self.mixed_path:
            # base-model requests (adapter None) use PEFT's reserved name
            kwargs["adapter_names"] = [it["adapter"] or "__base__" for it in items]
        elif self.adapters:
            if names == {None}:
                ctx = self.model.disable_adapter()
            elif names != {self.adapters[0]}:
                raise ValueError(f"a single-adapter engine got a batch for adapters {sorted(map(str, names))}; "
                                 f"batches hold either {self.adapters[0]} or base-model requests only")
        if self.ignore_eos:
            kwargs["min_new_tokens"] = self.output_tokens
        stamps: list[float] = []

        class Stamp:  # a streamer: generate calls put() once for the prompt, then once per new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        with torch.inference_mode(), ctx:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.output_tokens,
                                      do_sample=False, pad_token_id=tok.pad_token_id, streamer=Stamp(), **kwargs)
        if self.device == "cuda":
            torch.cuda.synchronize()
        done = time.perf_counter() - t0
        first = (stamps[1] - t0) if len(stamps) > 2 else done
        recs = []
        for it, row in zip(items, out[:, ids.shape[1]:].tolist()):
            if not self.ignore_eos and tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            # a batch finishes together in `generate`: every request's latency is the batch's; its own last token
            # (stamps[k]: the k-th new token) times its decoding, so that a row cut at EOS is not charged the
            # steps it waited for the others
            last = stamps[len(row)] - t0 if 1 <= len(row) < len(stamps) else done
            recs.append({"key": it["key"], "adapter": it["adapter"], "first": first, "done": done, "last": last,
                         "token_ids": row})
        return recs

    def profile(self, items: list[dict[str, Any]], reps: int) -> dict[str, Any]:
        """Where one prefill and one decode step of this batch spend their time: the base model's
        matrix products (every nn.Linear but the adapters' own), the LoRA operations (each LoRA
        layer's time minus its base matrix product: the rank-r products, dropout, scaling, the add)
        and everything else (attention, norms, activations, embedding, framework). Timers around
        the modules (CPU: synchronous; CUDA: synchronised); of `reps` repetitions, the one with the
        median total."""
        torch = self.torch
        from peft.tuners.lora import LoraLayer

        cuda = self.device == "cuda"
        clock = {"base": 0.0, "lora_layer": 0.0, "base_in_lora": 0.0}
        starts: dict[int, float] = {}
        handles = []
        in_lora = {id(m.base_layer) for m in self.model.modules() if isinstance(m, LoraLayer)}

        def now() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def timed(module, bucket: str) -> None:
            def pre(m, args):
                starts[id(m)] = now()

            def post(m, args, out):
                dt = now() - starts.pop(id(m))
                clock[bucket] += dt
                if bucket == "base" and id(m) in in_lora:
                    clock["base_in_lora"] += dt

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

        for name, m in self.model.named_modules():
            if isinstance(m, LoraLayer):
                timed(m, "lora_layer")
            elif isinstance(m, torch.nn.Linear) and ".lora_" not in name:
                timed(m, "base")
        tok = self.tok
        ids, mask = pad_batch([it["prompt_ids"] for it in items], tok.pad_token_id, side="left", device=self.device)
        phases: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}

        def step(phase: str, **kw):
            for k in clock:
                clock[k] = 0.0
            t0 = now()
            # logits at the last position only, as generate computes them (all positions would add
            # batch x length x vocab floats to the step and to the run's peak memory)
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
            total = now() - t0
            lora = clock["lora_layer"] - clock["base_in_lora"]
            phases[phase].append({"total": total, "base_matmul": clock["base"], "lora": lora,
                                  "other": total - clock["base"] - lora})
            return out

        try:
            with torch.inference_mode():
                for _ in range(reps):
                    out = step("prefill", input_ids=ids, attention_mask=mask)
                    nxt = out.logits[:, -1:].argmax(-1)
                    step("decode", input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                         past_key_values=out.past_key_values)
        finally:
            for h in handles:
                h.remove()
        # the repetition with the median total, whole (medians taken part by part would not add up)
        return {phase: sorted(recs, key=lambda r: r["total"])[(len(recs) - 1) // 2] | {"reps": len(recs)}
                for phase, recs in phases.items()}

    def run_open(self, items: list[dict[str, Any]], arrivals: list[float], max_batch: int) -> list[dict[str, Any]]:
        """Open loop on `generate`, as a simple server does it: whenever the model is free, every
        request that has arrived (up to `max_batch`, oldest first; one adapter per batch on a
        single-adapter engine) runs as one batch; later arrivals wait for the next."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        t0 = time.perf_counter()
        i = 0  # next request not yet arrived
        queue: list[int] = []
        while i < len(items) or queue:
            now = time.perf_counter() - t0
            while i < len(items) and arrivals[i] <= now:
                queue.append(i)
                i += 1
            if not queue:
                time.sleep(max(0.0, arrivals[i] - now))
                continue
            first_adapter = items[queue[0]]["adapter"]
            take = [j for j in queue if self.mixed_path or items[j]["adapter"] == first_adapter][:max_batch]
            queue = [j for j in queue if j not in take]
            started = time.perf_counter() - t0
            recs = self.run([items[j] for j in take])
            for j, r in zip(take, recs):
                out[j] = dict(r, arrival=arrivals[j], added=started, first=started + r["first"],
                              done=started + r["done"])
        return out  # type: ignore[return-value]

    def close(self) -> None:
        del self.model


# ---------------------------------------------------------------------------------------
# a long-lived worker: the parent sends one JSON command per line on stdin and reads one
# JSON reply per line on a pipe of its own (the engine's logs go to stdout/stderr)


def serve_loop(spec: dict[str, Any], commands, replies) -> int:
    """Build the engine, answer "ready" (settings, load memory, agreement checks), then run
    batches on request ({"cmd": "run", "items": [...]}) until {"cmd": "close"}."""
    mem = MemorySampler().start()
    t_start = time.perf_counter()
    engine = (VllmEngine if spec["engine"] == "vllm" else TransformersEngine)(spec)
    startup_s = time.perf_counter() - t_start
    after_load = mem.sample(pss=True)

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    ready: dict[str, Any] = {"event": "ready", "engine": spec["engine"], "mode": spec["mode"], "name": spec["name"],
                             "settings": engine.settings, "startup_seconds": startup_s,
                             "rss_after_load_bytes": after_load, "pss_after_load_bytes": mem.last_pss,
                             "device_after_load_bytes": device_used_bytes()}
    # correctness check: the same prompts in every configuration (greedy, fixed length)
    check = engine.run(spec["check_items"])
    ready["check"] = [{"key": r["key"], "adapter": r["adapter"], "token_ids": r["token_ids"]} for r in check]
    if spec.get("check_base"):
        # base-model requests in a batch of their own, never mixed into a LoRA batch (vLLM #48421)
        base_items = [dict(it, adapter=None) for it in spec["check_items"]]
        ready["check_base"] = [{"key": r["key"], "token_ids": r["token_ids"]} for r in engine.run(base_items)]
    reply(ready)
    for line in commands:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd["cmd"] == "close":
            break
        if cmd["cmd"] == "profile":
            try:
                reply({"event": "profile", "batch_size": len(cmd["items"]),
                       "split": engine.profile(cmd["items"], cmd["reps"])})
            except RuntimeError as exc:  # the timers could not see the time: said so, the run goes on
                reply({"event": "profile", "batch_size": len(cmd["items"]), "error": str(exc)})
            continue
        if cmd["cmd"] == "open":
            t_wall = time.time()
            if spec["engine"] == "vllm":
                recs = engine.run_open(cmd["items"], cmd["arrivals"])
            else:
                recs = engine.run_open(cmd["items"], cmd["arrivals"], cmd["max_batch"])
            reply({"event": "open", "t_start": t_wall,
                   "records": [{"arrival": r["arrival"], "added": r["added"], "first": r["first"], "done": r["done"],
                                "n_tokens": len(r["token_ids"])} for r in recs],
                   "peak_rss_bytes": mem.peak, "peak_pss_bytes": mem.peak_pss})
            continue
        t_wall = time.time()
        t0 = time.perf_counter()
        recs = engine.run(cmd["items"])
        wall = time.perf_counter() - t0
        reply({"event": "batch", "t_start": t_wall, "wall_seconds": wall,
               "records": [{"first": r["first"], "done": r["done"], "last": r.get("last", r["done"]),
                            "n_tokens": len(r["token_ids"])} for r in recs],
               "peak_rss_bytes": mem.peak, "peak_pss_bytes": mem.peak_pss, "device_used_bytes": device_used_bytes()})
    mem.stop()
    mem.sample(pss=True)
    engine.close()
    reply({"event": "closed", "peak_rss_bytes": mem.peak, "peak_pss_bytes": mem.peak_pss})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m lorascope.serve.worker SPEC.json REPLY_FD (commands on stdin)", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    fd = int(argv[1])
    os.set_inheritable(fd, False)  # the engine's own processes must not hold the pipe open after this one dies
    replies = os.fdopen(fd, "w")
    return serve_loop(spec, sys.stdin, replies)


if __name__ == "__main__":  # vLLM spawns processes: the entry point must be guarded
    sys.exit(main())
