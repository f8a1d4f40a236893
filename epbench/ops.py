"""Control-flow and array primitives that the core's algorithms are written against.

The algorithms (:mod:`epbench.algorithms`), the phases (:mod:`epbench.phases`) and the training
loop (:mod:`epbench.training`) are written once, as pure functions of arrays, against an
:class:`Ops` object and the array namespace ``ops.xp`` (the Python Array API standard through
``array-api-compat``). A backend hands the core its ``Ops``:

* :class:`EagerOps` runs every loop as a Python loop (PyTorch, NumPy);
* a compiling backend supplies loop combinators that trace into one program (JAX: ``lax.fori_loop``,
  ``lax.scan``, ``lax.cond``, ``jax.vmap``), so a whole phase, a BPTT sweep or a training chunk
  is still one compiled program.

Trees are nested tuples, lists and dicts of arrays (``None`` is an empty subtree), as in JAX.
"""

from __future__ import annotations

from typing import Any, Callable


def tree_map(f: Callable, tree, *rest):
    """``f`` applied leaf by leaf over trees of the same structure (tuple, list, dict; ``None``
    stays ``None``)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: tree_map(f, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(f, v, *(r[i] for r in rest)) for i, v in enumerate(tree))
    return f(tree, *rest)


def tree_leaves(tree) -> list:
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    return [tree]


def tree_unflatten(template, leaves):
    """A tree shaped like ``template`` with its leaves replaced, in order, by ``leaves``."""
    it = iter(leaves)
    return tree_map(lambda _: next(it), template)


class Ops:
    """What the core needs besides array arithmetic: loop combinators, the backend's autodiff,
    products, and the operations on feature maps that the Array API standard lacks. Subclasses
    override the loops (compiling backends) and supply ``vjp`` and the feature-map operations."""

    #: the array namespace (``array_api_compat.array_namespace`` of the backend's arrays)
    xp: Any = None
    #: ``vjp(f, *primals, has_aux=False) -> (out, pullback[, aux])`` as ``jax.vjp``, with
    #: ``pullback(cotangent) -> tuple`` (one cotangent per primal); ``None``: no autodiff (models
    #: then need an analytic ``step_vjp``)
    vjp: Any = None
    #: the Prop. 4 sweep runs eq. 32 alone and maps eq. 33 over t (``algorithms.bptt.prop4``)
    prefers_split_sweep: bool = False
    #: ``map(..., batched=True)`` is vectorised (``vmap``), not a loop
    vectorizes_maps: bool = False

    def pullback_stacked(self, pullback, cotangents, batched: bool = True):
        """``pullback`` (from :attr:`vjp`) applied to each cotangent of a stack (leading axis),
        results stacked (``batched``: as :meth:`map`)."""
        return self.map(pullback, cotangents, batched=batched)

    def unroll(self, spec, free: bool) -> int:
        """Steps per loop iteration of a phase (compiling backends: fewer loop round trips)."""
        return 1

    # ----- activations (docs/equations.md; ``epbench.models.activations`` by default) ---------
    def clip01(self, v):
        """clip(v, 0, 1), derivative 1 on 0 ≤ v ≤ 1 inclusive (the clamp; hard_sigmoid)."""
        from epbench.models import activations

        return activations.clip01(self.xp, v)

    def rho(self, name: str, v):
        from epbench.models import activations

        return self.clip01(v) if name == "hard_sigmoid" else activations.rho(self.xp, name, v)

    def rho_rho_prime(self, name: str, v):
        """(ρ(v), ρ'(v))."""
        from epbench.models import activations

        if name == "hard_sigmoid":
            return self.clip01(v), activations.rho_prime(self.xp, name, v)
        return activations.rho_rho_prime(self.xp, name, v)

    def rho_prime(self, name: str, v):
        from epbench.models import activations

        return activations.rho_prime(self.xp, name, v)

    def rho_second(self, name: str, v):
        from epbench.models import activations

        return activations.rho_second(self.xp, name, v)

    # ----- products ------------------------------------------------------------------------
    def matmul(self, a, b):
        return a @ b

    def linear(self, x, w, b=None):
        """x Wᵀ (+ b, a bias vector or an array of the result's shape)."""
        out = self.matmul(x, w.T)
        return out if b is None else b + out

    def matmul_add(self, c, a, b):
        """c + a @ b."""
        return c + self.matmul(a, b)

    def add_scaled(self, s, d, h: float):
        """s + h·d (one step of size h)."""
        return s + h * d

    # ----- feature maps (canonical layout (B, C, H, W) unless a backend chooses another) -------
    def maps_from_canonical(self, a):
        """Feature maps ``(..., C, H, W)`` to the backend's layout."""
        return a

    def maps_to_canonical(self, z):
        """Feature maps (any leading axes) back to ``(..., C, H, W)``."""
        return z

    def map_shape(self, chw: tuple[int, int, int]) -> tuple[int, ...]:
        """Per-sample shape of a ``(C, H, W)`` map in the backend's layout."""
        return tuple(chw)

    def flatten_maps(self, z):
        """``(B, C·H·W)`` in the canonical (C, H, W) order."""
        return self.xp.reshape(self.maps_to_canonical(z), (z.shape[0], -1))

    def unflatten_maps(self, v, chw: tuple[int, int, int]):
        return self.maps_from_canonical(self.xp.reshape(v, (v.shape[0], *chw)))

    def channel_sum(self, z):
        """Σ over batch and space: ``(C,)``."""
        return self.xp.sum(self.maps_to_canonical(z), axis=(0, 2, 3))

    def conv_kernel(self, w):
        """An OIHW kernel in the form ``conv2d``/``conv_transpose2d`` take (computed once per batch)."""
        return w

    def conv2d(self, z, kernel, b=None):
        """Valid stride-1 cross-correlation Conv(z, W)[b,o,m,n] = Σ_{c,r,q} W[o,c,r,q] z[b,c,m+r,n+q] (+ b_o)."""
        raise NotImplementedError("this backend has no convolutions")

    def conv_transpose2d(self, z, kernel):
        """The adjoint of z ↦ Conv(z, W)."""
        raise NotImplementedError("this backend has no convolutions")

    def conv2d_weight(self, z, g, w_shape):
        """The adjoint of W ↦ Conv(z, W) applied to g (batch-summed), OIHW."""
        raise NotImplementedError("this backend has no convolutions")

    def max_pool(self, z, p: int):
        """Max-pooling, window = stride = p: (values, argmax positions); the first maximum wins
        ties; differentiable in z (the gradient goes to the argmax, i.e. ``max_unpool``)."""
        raise NotImplementedError("this backend has no pooling")

    def max_unpool(self, v, idx, p: int, side: int):
        """Each value back at its argmax position on a ``side × side`` map, zeros elsewhere."""
        raise NotImplementedError("this backend has no pooling")

    def tree_map(self, f: Callable, tree, *rest):
        return tree_map(f, tree, *rest)

    def tree_leaves(self, tree) -> list:
        return tree_leaves(tree)

    def fori(self, n: int, body: Callable, carry, unroll: int = 1):
        """``carry = body(carry)`` n times (n is a Python int)."""
        for _ in range(n):
            carry = body(carry)
        return carry

    def scan(self, body: Callable, carry, xs=None, length: int | None = None, reverse: bool = False,
             first_y=None):
        """``lax.scan`` semantics: ``carry, y = body(carry, x)`` over the leading axis of ``xs``
        (or ``length`` times with ``x = None``); returns ``(carry, ys)`` with the ``y`` stacked
        in the order of ``xs`` (also when ``reverse`` runs from the last element back), and
        ``first_y`` (a tree like one ``y``), when given, stacked in front of them."""
        n = length if xs is None else self.tree_leaves(xs)[0].shape[0]
        order = range(n - 1, -1, -1) if reverse else range(n)
        ys = [None] * n
        for i in order:
            x = None if xs is None else self.tree_map(lambda a: a[i], xs)
            carry, ys[i] = body(carry, x)
        return carry, self.stack(ys if first_y is None else [first_y] + ys)

    def cond(self, pred, true_fn: Callable, false_fn: Callable, operand):
        """``true_fn(operand)`` if ``pred`` else ``false_fn(operand)`` (``pred`` a 0-d boolean array)."""
        return true_fn(operand) if bool(pred) else false_fn(operand)

    def map(self, f: Callable, *xs, batched: bool = True):
        """``f`` over the leading axis of the trees ``xs``, results stacked. ``batched``: the
        backend may vectorise it (one large product instead of many small ones)."""
        n = self.tree_leaves(xs)[0].shape[0]
        return self.stack([f(*self.tree_map(lambda a: a[i], xs)) for i in range(n)])

    def stack(self, trees: list):
        """Trees of the same structure stacked leaf by leaf along a new leading axis."""
        if not trees or trees[0] is None:
            return None
        return self.tree_map(lambda *leaves: self.xp.stack(leaves), trees[0], *trees[1:])

    def concat_front(self, first, rest):
        """``first`` (one slice) put in front of the stacked ``rest``."""
        return self.tree_map(lambda a, b: self.xp.concat([a[None, ...], b], axis=0), first, rest)


class EagerOps(Ops):
    """Python loops over an eager array library (the default: PyTorch, NumPy)."""

    def __init__(self, xp):
        self.xp = xp
