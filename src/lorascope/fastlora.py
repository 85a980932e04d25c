"""The LoRA training step at the speed its arithmetic allows, on PEFT's own modules.

`use_fast_lora(model)` reroutes the forward of every PEFT LoRA `Linear` of a model; the modules,
parameters and state dict stay PEFT's, so `save_pretrained` writes a standard adapter. Two paths:

- `LoraLinearFn`, one projection: y = x W^T + b + s (dropout(x) A^T) B^T with the scale and the
  sum folded into one `addmm_`, the adapter's input gradient added into the base one in place,
  and no weight gradient ever computed for the frozen W.
- `LoraGroupFn`, projections that read the same input (q/k/v of an attention block, gate/up of
  a gated MLP; `GROUPS`): one product with the stacked A matrices instead of one per projection
  in the forward and for A's gradient, and the input gradients of the whole group summed into
  one buffer instead of one tensor per projection that autograd then adds up. The first member
  called computes the whole group; its siblings, called next with the very same input tensor,
  take their outputs from it. A sibling called with another input, dropout > 0 (each
  projection draws its own mask in PEFT) or anything the fast path does not cover falls back to
  the single-projection path or to PEFT's forward.

Both compute the same maths as PEFT's layers (float64 tests compare outputs and every gradient);
what changes is the number of passes over the activations, which is what a LoRA step on a CPU
is bound by besides the base model's matrix products (benchmarks/profile_train_step.py).
"""

from __future__ import annotations

import torch

# sibling projections that read the same input in the decoder blocks of Llama-style models
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def use_fast_lora(model, group: bool = True) -> int:
    """Route the forward of every PEFT LoRA Linear in `model` through the fast path; return how many.

    Anything the fast path does not cover (merged or disabled adapters, several active adapters,
    DoRA and other variants, extra call arguments) falls back to PEFT's forward.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    n = 0
    for parent in model.modules():
        children = {name: m for name, m in parent.named_children()
                    if isinstance(m, PeftLoraLinear) and not hasattr(m, "_lorascope_peft_forward")}
        grouped = {}
        if group:
            for names in GROUPS:
                members = [children[x] for x in names if x in children]
                if len(members) > 1:
                    runner = _Group(members)
                    grouped.update({id(m): runner for m in members})
        for module in children.values():
            module._lorascope_peft_forward = module.forward
            module.forward = _fast_forward(module, grouped.get(id(module)))
            n += 1
    return n


def _plain_lora(module):
    """(adapter name, dropout p) when the fast path covers this call's module state, else None."""
    active = module.active_adapters
    if (module.merged or module.disable_adapters or len(active) != 1 or active[0] in module.lora_variant
            or active[0] not in module.lora_A or getattr(module, "fan_in_fan_out", False)):
        return None
    name = active[0]
    drop = module.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return name, p


def _fast_forward(module, group: _Group | None):
    peft_forward = module.forward

    def forward(x, *args, **kwargs):
        state = None if args or kwargs else _plain_lora(module)
        if state is None:
            return peft_forward(x, *args, **kwargs)
        name, p = state
        if group is not None and p == 0.0:
            out = group(module, x)
            if out is not None:
                return out
        base = module.get_base_layer()
        return LoraLinearFn.apply(x, base.weight, base.bias, module.lora_A[name].weight,
                                  module.lora_B[name].weight, float(module.scaling[name]), p)

    return forward


class _Group:
    """Computes sibling projections of one input together and hands each sibling its output once."""

    def __init__(self, members):
        self.members = list(members)
        self.x = None
        self.pending: dict[int, torch.Tensor] = {}

    def __call__(self, module, x):
        if id(module) in self.pending:
            out, same = self.pending.pop(id(module)), self.x is x
            if not self.pending:
                self.x = None
            return out if same else None  # computed from another input: this sibling goes alone
        states = [_plain_lora(m) for m in self.members]
        if any(s is None or s[1] != 0.0 for s in states):
            return None
        params, scales = [], []
        for m, (name, _) in zip(self.members, states):
            base = m.get_base_layer()
            params += [base.weight, base.bias, m.lora_A[name].weight, m.lora_B[name].weight]
            scales.append(float(m.scaling[name]))
        outs = LoraGroupFn.apply(x, tuple(scales), *params)
        self.x = x
        self.pending = {id(m): o for m, o in zip(self.members, outs) if m is not module}
        return outs[next(i for i, m in enumerate(self.members) if m is module)]


def _rank_mm(g, b):
    """g @ b for a tall g (tokens x d) and a thin b (d x r), as (b^T g^T)^T: the same product, but
    BLAS gets it as r rows times a long matrix, which it does ~3x faster than a matrix times r
    columns (measured on CPU: 0.27 vs 0.80 ms for 904 x 1536 times 1536 x 8). A transposed view."""
    return (b.t() @ g.t()).t()


def _outer_mm(g, xa):
    """g^T @ xa (d x r: the gradient of B) as (xa^T g)^T, for the same reason (0.30 vs 1.04 ms);
    contiguous, as a parameter's gradient should be."""
    return (xa.t() @ g).t().contiguous()


def _compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s * (dropout_p(x) A^T) B^T for a frozen W and b, in as few passes as the maths allows.

    The same arithmetic as PEFT's LoRA Linear (and the same dropout mask for the same RNG
    state: `torch.native_dropout` draws exactly as `nn.Dropout` does), but the scale and the
    sum are folded into one `addmm_`, the input gradient of the adapter is added into the base
    one in place, and backward keeps only the dropped input (or the input itself when p = 0,
    shared with the caller), the dropout mask and the rank-r activation: no weight gradient
    is ever computed for W. Under autocast it computes in the autocast dtype like F.linear.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float):
        dtype = _compute_dtype(x)
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype)
        with torch.autocast(x.device.type, enabled=False):
            xc, w, a, b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
            bc = bias.to(dtype) if bias is not None else None
            shape = x.shape
            x2 = xc.reshape(-1, shape[-1])
            y = torch.nn.functional.linear(x2, w, bc)
            mask = None
            if p > 0.0:
                xd, mask = torch.native_dropout(x2, p, True)
            else:
                xd = x2
            xa = xd @ a.t()
            y.addmm_(xa, b.t(), alpha=scale)
        ctx.scale, ctx.p, ctx.shape = scale, p, shape
        ctx.save_for_backward(xd, mask, xa, w, a, b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd, mask, xa, w, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gxa = _rank_mm(g, b).mul_(ctx.scale)  # gradient at the rank-r activation
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = _outer_mm(g, xa).mul_(ctx.scale).to(b_dtype)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(gxa.t(), xd).to(a_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = g @ w
            if mask is None:
                grad_x.addmm_(gxa, a)
            else:
                grad_x += torch.ops.aten.native_dropout_backward(gxa @ a, mask, 1.0 / (1.0 - ctx.p))
            grad_x = grad_x.view(ctx.shape).to(x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class LoraGroupFn(torch.autograd.Function):
    """Projections i = 1..k of one input, y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T, without dropout.

    Arguments: x, the scales (s_1..s_k), then W_i, b_i, A_i, B_i for each projection in turn.
    Forward: one product x [A_1; ...; A_k]^T for all rank-r activations. Backward: one product for
    the gradients of all A_i, and the input gradient sum_i (g_i W_i + s_i g_i B_i A_i) accumulated
    into a single buffer. W_i and b_i are frozen: their gradients are never computed.
    """

    @staticmethod
    def forward(ctx, x, scales, *params):
        dtype = _compute_dtype(x)
        k = len(scales)
        ws, bs, as_, bbs = (params[j::4] for j in range(4))
        ctx.dtypes = (x.dtype, [a.dtype for a in as_], [b.dtype for b in bbs])
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.to(dtype).reshape(-1, shape[-1])
            ws = [w.to(dtype) for w in ws]
            bbs = [b.to(dtype) for b in bbs]
            a_cat = torch.cat([a.to(dtype) for a in as_])
            xa = x2 @ a_cat.t()
            ranks = [a.shape[0] for a in as_]
            outs, off = [], 0
            for i in range(k):
                y = torch.nn.functional.linear(x2, ws[i], bs[i].to(dtype) if bs[i] is not None else None)
                y.addmm_(xa[:, off:off + ranks[i]], bbs[i].t(), alpha=scales[i])
                outs.append(y.view(*shape[:-1], y.shape[-1]))
                off += ranks[i]
        ctx.scales, ctx.ranks, ctx.shape = scales, ranks, shape
        ctx.save_for_backward(x2, xa, a_cat, *ws, *bbs)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a_cat, *rest = ctx.saved_tensors
        k = len(ctx.scales)
        ws, bbs = rest[:k], rest[k:]
        x_dtype, a_dtypes, b_dtypes = ctx.dtypes
        need = ctx.needs_input_grad
        gxa = torch.zeros(x2.shape[0], a_cat.shape[0], dtype=x2.dtype, device=x2.device)
        grad_x = None
        grads_b: list = [None] * k
        off = 0
        for i, grad in enumerate(grads):
            r, s = ctx.ranks[i], ctx.scales[i]
            if grad is not None:
                g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
                gxa[:, off:off + r] = _rank_mm(g, bbs[i]).mul_(s)
                if need[2 + 4 * i + 3]:
                    grads_b[i] = _outer_mm(g, xa[:, off:off + r]).mul_(s).to(b_dtypes[i])
                if need[0]:
                    grad_x = g @ ws[i] if grad_x is None else grad_x.addmm_(g, ws[i])
            off += r
        grads_a: list = [None] * k
        if any(need[2 + 4 * i + 2] for i in range(k)):
            ga = torch.mm(gxa.t(), x2)
            off = 0
            for i in range(k):
                grads_a[i] = ga[off:off + ctx.ranks[i]].to(a_dtypes[i]) if need[2 + 4 * i + 2] else None
                off += ctx.ranks[i]
        if need[0] and grad_x is not None:
            grad_x.addmm_(gxa, a_cat)
            grad_x = grad_x.view(ctx.shape).to(x_dtype)
        out = [grad_x, None]
        for i in range(k):
            out += [None, None, grads_a[i], grads_b[i]]
        return tuple(out)
