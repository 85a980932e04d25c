"""The fast LoRA training path: same maths as PEFT's layers, same training run, standard adapters."""

import json

import pytest
import torch

from lorascope import fastlora as F
from lorascope import train as T
from lorascope.config import load_config


def _peft_linear(d_in=24, d_out=16, r=4, p=0.0, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=True)).double()
    net = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r + 1, lora_dropout=p, target_modules=["0"]))
    layer = net.base_model.model[0]
    with torch.no_grad():  # B starts at zero; a random B makes every gradient term count
        layer.lora_B["default"].weight.normal_()
    return net, layer


def _run(net, layer, x, seed):
    """Output and gradients of x, A and B for one forward/backward with a fixed dropout RNG state."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = net(x)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out = [y.detach(), x.grad, a.grad.clone(), b.grad.clone()]
    a.grad = b.grad = None
    return out


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fast_layer_equals_peft_layer_in_float64(p):
    net, layer = _peft_linear(p=p)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ref = _run(net, layer, x, seed=7)
    assert T.use_fast_lora(net) == 1
    fast = _run(net, layer, x, seed=7)
    for r, f in zip(ref, fast):  # same dropout mask for the same RNG state: equal to float64 rounding
        torch.testing.assert_close(f, r, rtol=1e-12, atol=1e-12)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None  # frozen stays frozen


def test_fast_layer_by_hand_plain_loop():
    """Independent check: the LoRA output computed element by element."""
    net, layer = _peft_linear(d_in=5, d_out=3, r=2)
    T.use_fast_lora(net)
    x = torch.randn(4, 5, dtype=torch.float64)
    y = net(x)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    for n in range(4):
        for o in range(3):
            v = bias[o].item() + sum(x[n, i].item() * w[o, i].item() for i in range(5))
            v += s * sum(b[o, k].item() * sum(a[k, i].item() * x[n, i].item() for i in range(5)) for k in range(2))
            assert abs(y[n, o].item() - v) < 1e-12


def test_dropout_masks_of_the_fast_layer_are_fresh_and_scaled():
    net, layer = _peft_linear(p=0.5, d_in=400)
    T.use_fast_lora(net)
    with torch.no_grad():
        layer.base_layer.weight.zero_(), layer.base_layer.bias.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(4, 400, dtype=torch.float64))
        layer.lora_B["default"].weight.copy_(torch.eye(16, 4, dtype=torch.float64))
    layer.scaling["default"] = 1.0
    x = torch.ones(2000, 400, dtype=torch.float64)
    y1, y2 = net(x)[:, :4], net(x)[:, :4]
    assert set(y1.unique().tolist()) == {0.0, 2.0}  # kept inputs are scaled by 1 / (1 - p)
    assert abs((y1 == 0).double().mean().item() - 0.5) < 0.03 and not torch.equal(y1, y2)
    net.eval()  # no dropout at inference
    assert torch.equal(net(x)[:, :4], torch.ones(2000, 4, dtype=torch.float64))


class _Block(torch.nn.Module):
    """An attention-like block: q, k and v read the same input, o reads another one."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(24, 16)
        self.k_proj = torch.nn.Linear(24, 8)
        self.v_proj = torch.nn.Linear(24, 8, bias=False)
        self.o_proj = torch.nn.Linear(16, 24)
        self.copy_k_input = False

    def forward(self, x):
        q, v = self.q_proj(x), self.v_proj(x)
        k = self.k_proj(x.clone() if self.copy_k_input else x)
        return self.o_proj(q * torch.cat([k, v], -1).tanh())


def _block(p=0.0, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = torch.nn.Sequential(_Block()).double()
    cfg = LoraConfig(r=4, lora_alpha=9, lora_dropout=p, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     rank_pattern={"k_proj": 2})  # ranks differ inside the group
    net = get_peft_model(net, cfg)
    with torch.no_grad():
        for n, prm in net.named_parameters():
            if "lora_B" in n:
                prm.normal_()
    return net, net.base_model.model[0]


def _block_run(net, x, seed):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = net(x)
    (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    grads = {n: prm.grad.clone() for n, prm in net.named_parameters() if prm.grad is not None}
    net.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _counting(monkeypatch):
    calls = []
    apply = F.LoraGroupFn.apply
    monkeypatch.setattr(F.LoraGroupFn, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.parametrize("copy_k_input", [False, True])
def test_grouped_projections_equal_peft_in_float64(monkeypatch, copy_k_input):
    net, block = _block()
    block.copy_k_input = copy_k_input
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ref = _block_run(net, x, seed=1)
    calls = _counting(monkeypatch)
    assert F.use_fast_lora(net) == 4
    for _ in range(2):  # twice: the group's hand-over state is clean after each call
        y, gx, grads = _block_run(net, x, seed=1)
        torch.testing.assert_close(y, ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, ref[1], rtol=1e-12, atol=1e-12)
        assert grads.keys() == ref[2].keys() and len(grads) == 8  # A and B of 4 projections, nothing frozen
        for n in grads:
            torch.testing.assert_close(grads[n], ref[2][n], rtol=1e-12, atol=1e-12)
    # q, k, v computed together once per forward; with k reading a copy of x, k goes alone
    assert len(calls) == 2


def test_grouped_projections_fall_back_under_dropout(monkeypatch):
    net, _ = _block(p=0.3)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    ref = _block_run(net, x, seed=4)
    calls = _counting(monkeypatch)
    F.use_fast_lora(net)
    y, gx, grads = _block_run(net, x, seed=4)  # each projection draws its own mask, as in PEFT
    assert calls == []
    torch.testing.assert_close(y, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref[1], rtol=1e-12, atol=1e-12)
    net.eval()  # no dropout at inference: the group path again
    with torch.no_grad():
        net(x)
    assert len(calls) == 1


def _cfg(tiny_model, data, out, method="lora", dropout=0.1):
    sets = ["train.batch_size=8", "train.micro_batch_size=4", "train.save_every=0", "train.log_every=1",
            "train.max_steps=5", f"lora.dropout={dropout}", "train.lr=5e-3", "train.weight_decay=0.01"]
    return load_config(None, sets, **{"train.task": "mrpc", "train.method": method, "train.output_dir": str(out),
                                      "model.name": str(tiny_model), "data.dir": str(data)})


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,dropout", [("lora", 0.1), ("lora", 0.0), ("full", 0.0)])
def test_loss_curve_equals_the_stock_path(tiny_model, small_data, tmp_path, monkeypatch, method, dropout):
    from safetensors.torch import load_file

    fast_dir = T.train(_cfg(tiny_model, small_data, tmp_path / "fast", method, dropout))
    called = []
    with monkeypatch.context() as m:  # the path before: PEFT's own layers, per-tensor AdamW
        m.setattr(T, "use_fast_lora", lambda model: called.append(model) or 0)
        m.setattr(T, "FUSED_ADAMW", False)
        stock_dir = T.train(_cfg(tiny_model, small_data, tmp_path / "stock", method, dropout))
    assert len(called) == (1 if method == "lora" else 0)  # the switch really took the stock path
    fast, stock = _losses(tmp_path / "fast"), _losses(tmp_path / "stock")
    assert len(fast) == 5 and fast[-1] < fast[0]
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(fast_dir / name), load_file(stock_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_saved_adapter_is_a_standard_peft_adapter(tiny_model, tmp_path):
    from peft import PeftModel

    from lorascope.models import load_model

    cfg = load_config(None, ["lora.dropout=0.1"], **{"model.name": str(tiny_model)})
    model = T._add_lora(load_model(str(tiny_model)), cfg)
    assert sum(hasattr(m, "_lorascope_peft_forward") for m in model.modules()) == 2 * 7
    torch.manual_seed(3)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(std=0.05)
    model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(load_model(str(tiny_model)), str(tmp_path / "adapter"))
    ids = torch.randint(0, 300, (2, 11))
    model.eval(), loaded.eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        base = loaded.get_base_model()
        with loaded.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
