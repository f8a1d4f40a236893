"""``TorchOps``: the primitives of :class:`epbench.ops.Ops` on PyTorch (eager Python loops).

Feature maps are NCHW (the canonical layout). ``vjp`` is one ``torch.autograd.grad`` through
the function's recorded graph, with the primals as fresh leaves; its pullback may be called
more than once (the graph is retained).

On a CUDA device (``device_side=True``) nothing in a program reads a value back to the host:
``cond`` evaluates both branches and selects on the device, so that a whole phase or training
chunk runs without a synchronisation and can be captured as one CUDA graph
(:mod:`epbench_torch.graphs`). On the CPU ``cond`` reads its predicate and runs one branch.

``functional=True`` (trials batched, ``EPBENCH_BATCH_TRIALS=1``): ``vjp`` is ``torch.func.vjp``
and a batched ``map`` is ``torch.func.vmap``, so that a whole training chunk, VJPs included,
can be mapped over stacked trials (``torch.autograd.grad`` cannot run under ``vmap``).
"""

from __future__ import annotations

import array_api_compat.torch as xp
import torch
import torch.nn.functional as F

from epbench.ops import EagerOps, tree_leaves, tree_map, tree_unflatten


class TorchOps(EagerOps):
    def __init__(self, device_side: bool = False, functional: bool = False):
        super().__init__(xp)
        #: ``cond`` selects on the device instead of reading its predicate (no host synchronisation;
        #: needed under ``vmap`` too, which cannot read a value)
        self.device_side = device_side or functional
        #: ``torch.func`` transforms for ``vjp`` and batched ``map`` (they compose with ``vmap``)
        self.functional = functional

    def cond(self, pred, true_fn, false_fn, operand):
        """``true_fn(operand)`` where ``pred`` else ``false_fn(operand)``; with ``device_side``
        both are computed and ``torch.where`` picks leaf by leaf (the same values, no sync)."""
        if not self.device_side:
            return super().cond(pred, true_fn, false_fn, operand)
        return tree_map(lambda a, b: torch.where(pred, a, b), true_fn(operand), false_fn(operand))

    def clip01(self, v):
        return v.clamp(0.0, 1.0)

    def rho(self, name: str, v):
        if name == "sigmoid":  # 1 / (1 + exp(−4(v − ½)))
            return torch.sigmoid(4.0 * v - 2.0)
        if name == "hard_sigmoid":
            return v.clamp(0.0, 1.0)
        return torch.tanh(v)

    def rho_rho_prime(self, name: str, v):
        r = self.rho(name, v)
        if name == "sigmoid":
            return r, 4.0 * r * (1.0 - r)
        if name == "hard_sigmoid":
            return r, ((v >= 0) & (v <= 1)).to(v.dtype)
        return r, 1.0 - r * r

    def matmul(self, a, b):
        return torch.matmul(a, b)

    def linear(self, x, w, b=None):
        if b is None or b.ndim == 1:
            return F.linear(x, w, b)
        return torch.addmm(b, x, w.t())

    def matmul_add(self, c, a, b):
        return torch.addmm(c, a, b)

    def add_scaled(self, s, d, h: float):
        return torch.add(s, d, alpha=h)

    def map(self, f, *xs, batched: bool = True):
        """``torch.func.vmap`` when ``functional`` and ``batched``, else a loop."""
        if self.functional and batched:
            return torch.func.vmap(f)(*xs)
        return super().map(f, *xs, batched=batched)

    def vjp(self, f, *primals, has_aux: bool = False):
        if self.functional:
            return torch.func.vjp(f, *primals, has_aux=has_aux)
        leaves = tree_map(lambda a: a.detach().requires_grad_(True), primals)
        with torch.enable_grad():
            res = f(*leaves)
        out, aux = res if has_aux else (res, None)
        inputs = tree_leaves(leaves)
        outputs = tree_leaves(out)
        live = [i for i, o in enumerate(outputs) if o.requires_grad]

        def pullback(cotangent, batched: bool = False):
            cts = tree_leaves(cotangent)
            grads = torch.autograd.grad([outputs[i] for i in live], inputs, [cts[i] for i in live],
                                        retain_graph=True, allow_unused=True, materialize_grads=not batched,
                                        is_grads_batched=batched)
            if batched:  # unused inputs: zeros of the stacked shape
                n = cts[0].shape[0]
                grads = [torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
                         for g, x in zip(grads, inputs)]
            return tree_unflatten(leaves, grads)

        return (out, pullback, aux) if has_aux else (out, pullback)

    def pullback_stacked(self, pullback, cotangents, batched: bool = True):
        """One batched backward pass for every cotangent of the stack (``is_grads_batched``;
        ``torch.func.vmap`` of the pullback when ``functional``)."""
        if self.functional:
            return torch.func.vmap(pullback)(cotangents)
        return pullback(cotangents, batched=True)

    def conv2d(self, z, kernel, b=None):
        return F.conv2d(z, kernel, b)

    def conv_transpose2d(self, z, kernel):
        return F.conv_transpose2d(z, kernel)

    def conv2d_weight(self, z, g, w_shape):
        return torch.nn.grad.conv2d_weight(z, w_shape, g)

    def max_pool(self, z, p: int):
        return F.max_pool2d(z, p, return_indices=True)

    def max_unpool(self, v, idx, p: int, side: int):
        return F.max_unpool2d(v, idx, p, output_size=(side, side))

    def channel_sum(self, z):
        return z.sum((0, 2, 3))
