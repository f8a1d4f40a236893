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


class Ops:
    """What the core needs besides array arithmetic. Subclasses override the loops."""

    #: the array namespace (``array_api_compat.array_namespace`` of the backend's arrays)
    xp: Any = None

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
