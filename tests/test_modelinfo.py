"""One reader for trained models' folders (lorascope/modelinfo.py), used by eval, weights and serve-bench."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from lorascope import LorascopeError
from lorascope.modelinfo import check_adapter_weights, read_model_dir, require_lora


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    out = tmp_path_factory.mktemp("modelinfo") / "adapter"
    model.save_pretrained(out, safe_serialization=True)
    (out / "lorascope-model.json").write_text(json.dumps({"base_model": str(tiny_model), "method": "lora",
                                                          "task": "mrpc"}))
    return out


def test_kinds_and_records(adapter, tiny_model, tmp_path):
    info = read_model_dir(adapter, "x")
    assert info.kind == "lora" and info.method == "lora" and info.rank == 4 and info.meta["task"] == "mrpc"
    assert info.base_model == str(tiny_model) and info.adapter_config["lora_alpha"] == 8
    full = read_model_dir(tiny_model, "x")
    assert full.kind == "full" and full.adapter_config is None and full.rank is None
    with pytest.raises(LorascopeError, match=r"^where: no such directory; expected a PEFT adapter directory$"):
        read_model_dir(tmp_path / "nope", "where", expected="a PEFT adapter directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorascopeError, match=r"neither adapter_config.json \(PEFT adapter\) nor config.json"):
        read_model_dir(tmp_path / "empty", "where")


def test_adapted_matrices_against_the_base_by_hand(adapter, tiny_model):
    from safetensors import safe_open

    base = {}
    with safe_open(str(tiny_model / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            base[k] = list(fh.get_slice(k).get_shape())
    shapes, modules = check_adapter_weights(adapter, "x", base, "tiny")
    expected = []
    for k in sorted(base):  # every q_proj and down_proj of the base, with its sizes: the adapter adapts exactly those
        if k.endswith(("q_proj.weight", "down_proj.weight")):
            expected.append({"module": k, "d_in": base[k][1], "d_out": base[k][0], "rank": 4})
    assert sorted(modules, key=lambda m: m["module"]) == expected and len(shapes) == 2 * len(expected)


def test_bad_folders_one_line_each(adapter, tmp_path):
    def copy(name):
        return Path(shutil.copytree(adapter, tmp_path / name))

    d = copy("meta")
    (d / "lorascope-model.json").write_text("{not json")
    with pytest.raises(LorascopeError, match=r"^w: lorascope-model.json is not valid JSON .*; expected lorascope's"):
        read_model_dir(d, "w")
    d = copy("acfg")
    (d / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(LorascopeError, match=r"^w: adapter_config.json holds a list, not an object"):
        read_model_dir(d, "w")
    d = copy("dora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    require_lora(read_model_dir(d, "w"), "w")  # DoRA is a LoRA adapter for loading ...
    with pytest.raises(LorascopeError, match=r"^w: DoRA adapters \(use_dora: true\) are not supported"):
        require_lora(read_model_dir(d, "w"), "w", dora=False)  # ... but not for the weight-space analysis
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LorascopeError, match=r"^w: peft_type 'IA3'; only LoRA adapters are supported"):
        require_lora(read_model_dir(d, "w"), "w")
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    with pytest.raises(LorascopeError, match=r"^w: adapter_config.json field r=0; expected a positive rank"):
        require_lora(read_model_dir(d, "w"), "w")
    d = copy("trunc")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(LorascopeError, match=r"^w: adapter_model.safetensors is unreadable"):
        check_adapter_weights(d, "w")


def test_every_command_reads_the_record_the_same_way(adapter, tiny_model, small_data, tmp_path):
    """eval, weights and serve-bench share the reader: the same bad record, the same one line."""
    d = Path(shutil.copytree(adapter, tmp_path / "bad"))
    (d / "lorascope-model.json").write_text("{not json")
    runs = {
        "eval": run_cli("eval", "--task", "mrpc", "--checkpoint", str(d), "--model", str(tiny_model),
                        "--data-dir", str(small_data), "--output", str(tmp_path / "e.json")),
        "weights": run_cli("weights", "--base", str(tiny_model), "--tuned", f"l={d}", "--output-dir",
                           str(tmp_path / "w")),
        "serve-bench": run_cli("serve-bench", "--engine", "transformers", "--base", str(tiny_model), "--adapter",
                               f"a={d}", "--output-dir", str(tmp_path / "s")),
    }
    for cmd, r in runs.items():
        lines = [x for x in r.stderr.strip().splitlines() if "lorascope-model.json" in x]
        assert r.returncode == 2 and lines, (cmd, r.stderr[-1500:])
        assert all("lorascope-model.json is not valid JSON" in x and str(d) in x for x in lines), (cmd, lines)
        if cmd != "serve-bench":  # serve-bench names the adapter's failure once more in its summary
            assert len(r.stderr.strip().splitlines()) == 1, (cmd, r.stderr[-1500:])
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "s" / "serve.json").exists()
