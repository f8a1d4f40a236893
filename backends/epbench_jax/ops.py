"""The JAX :class:`~epbench.ops.Ops`: the loops, autodiff, products and feature-map operations
that the core's models, phases and algorithms are traced against, inside one ``jax.jit``
program per call (``lax.fori_loop`` / ``lax.scan`` / ``lax.cond``, ``jax.vmap`` / ``lax.map``,
never Python loops over time).

Every product runs at ``lax.Precision.HIGHEST`` (IEEE float32, no TF32 on GPUs).

Feature maps are channels-last inside the programs, ``(B, H, W, C)`` (what CPUs multiply
fastest); ``maps_from_canonical`` / ``maps_to_canonical`` convert from / to the canonical
``(B, C, H, W)``. Convolutions are matrix products over k×k patches: on CPU this beats XLA's
own convolutions, and the transposes of "patches" and "overlap-add" are each other, so their
derivatives are the same two products again (custom VJPs; autodiff would expand them into slow
pad chains). A kernel is taken in the two matrix forms once per batch (:meth:`JaxOps.conv_kernel`).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from epbench.errors import EpbenchError
from epbench.ops import Ops

#: full float32 precision for every product (no TF32 on GPUs)
HI = lax.Precision.HIGHEST


def mm(a, b):
    """Matrix product at full precision."""
    return jnp.matmul(a, b, precision=HI)


# ----- convolutions (channels last) ---------------------------------------------------------
def _patches(z, k: int):
    """(B, H, W, C) → (B·H'·W', k·k·C), H' = H − k + 1: each k×k patch, ordered (r, q, c)."""
    b, h, w, c = z.shape
    ho, wo = h - k + 1, w - k + 1
    rows = jnp.concatenate([z[:, :, q:q + wo, :] for q in range(k)], -1)  # (B, H, W', k·C)
    cols = jnp.concatenate([rows[:, r:r + ho] for r in range(k)], -1)  # (B, H', W', k·k·C)
    return cols.reshape(b * ho * wo, k * k * c)


def _overlap_add(y, k: int):
    """(B, H', W', k, k, C) → (B, H'+k−1, W'+k−1, C): out[b, m+r, n+q] += y[b, m, n, r, q]."""
    cols = []
    for q in range(k):
        acc = None
        for r in range(k):
            t = jnp.pad(y[:, :, :, r, q, :], ((0, 0), (r, k - 1 - r), (0, 0), (0, 0)))
            acc = t if acc is None else acc + t
        cols.append(acc)
    out = None
    for q in range(k):
        t = jnp.pad(cols[q], ((0, 0), (0, 0), (q, k - 1 - q), (0, 0)))
        out = t if out is None else out + t
    return out


def conv_matrix(w):
    """OIHW kernel → the (k·k·C_in, C_out) matrix of :func:`conv_mat`: wc[(r, q, c), o] = W[o, c, r, q]."""
    o, c, k, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(k * k * c, o)


def conv_t_matrix(w):
    """OIHW kernel → the (C_out, k·k·C_in) matrix of :func:`conv_t_mat`: wt[o, (r, q, c)] = W[o, c, r, q]."""
    o, c, k, _ = w.shape
    return w.transpose(0, 2, 3, 1).reshape(o, k * k * c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_mat(z, wc, k: int):
    """Conv(z, W) (NHWC), ``wc = conv_matrix(W)``: valid, stride-1 cross-correlation
    Conv(z, W)[b,m,n,o] = Σ_{c,r,q} W[o,c,r,q] z[b,m+r,n+q,c] (appendix eq. 74)."""
    b, h, wd, _ = z.shape
    return mm(_patches(z, k), wc).reshape(b, h - k + 1, wd - k + 1, wc.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_t_mat(z, wt, k: int):
    """ConvT(z, W) (NHWC), ``wt = conv_t_matrix(W)``: the adjoint of Conv(·, W)
    (``conv_transpose2d``, appendix eq. 75), ConvT(z, W)[b,i,j,c] = Σ_{o,r,q} W[o,c,r,q] z[b,i−r,j−q,o]:
    each input pixel times wt, overlap-added."""
    b, h, wd, o = z.shape
    y = mm(z.reshape(b * h * wd, o), wt)
    return _overlap_add(y.reshape(b, h, wd, k, k, wt.shape[1] // (k * k)), k)


def _conv_mat_fwd(z, wc, k):
    return conv_mat(z, wc, k), (z, wc)


def _conv_mat_bwd(k, res, g):
    z, wc = res
    gw = mm(_patches(z, k).T, g.reshape(-1, wc.shape[1]))
    return conv_t_mat(g, wc.T, k), gw


def _conv_t_mat_fwd(z, wt, k):
    return conv_t_mat(z, wt, k), (z, wt)


def _conv_t_mat_bwd(k, res, g):
    z, wt = res
    gw = mm(z.reshape(-1, wt.shape[0]).T, _patches(g, k))
    return conv_mat(g, wt.T, k), gw


conv_mat.defvjp(_conv_mat_fwd, _conv_mat_bwd)
conv_t_mat.defvjp(_conv_t_mat_fwd, _conv_t_mat_bwd)


def conv(z, w):
    """Conv(z, W) for NHWC z and an OIHW kernel."""
    return conv_mat(z, conv_matrix(w), w.shape[-1])


def conv_t(z, w):
    """ConvT(z, W) for NHWC z and an OIHW kernel."""
    return conv_t_mat(z, conv_t_matrix(w), w.shape[-1])


def conv_weight_grad(z, g, w_shape):
    """G[o,c,r,q] = Σ_{b,m,n} g[b,m,n,o] z[b,m+r,n+q,c] (NHWC z, g): the transpose of
    ``W ↦ Conv(z, W)``, in the OIHW layout."""
    o, c, k, _ = w_shape
    gw = mm(_patches(z, k).T, g.reshape(-1, o))  # ((r, q, c), o)
    return gw.reshape(k, k, c, o).transpose(3, 2, 0, 1)


# ----- max-pooling with indices (channels last) ---------------------------------------------
def _windows(z, p: int):
    """(B, H, W, C) → (B, H//p, W//p, C, p·p): the pooling windows, row-major inside each."""
    b, h, w, c = z.shape
    hp, wp = h // p, w // p
    z = z[:, : hp * p, : wp * p].reshape(b, hp, p, wp, p, c)
    return z.transpose(0, 1, 3, 5, 2, 4).reshape(b, hp, wp, c, p * p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def pool(z, p: int):
    """Max-pooling with window = stride = p: (values, argmax index inside each window).
    The first maximum in row-major window order wins ties (as ``torch``); the derivative of
    the values goes to that position only (Unpool)."""
    win = _windows(z, p)
    return jnp.max(win, axis=-1), jnp.argmax(win, axis=-1)


def _pool_fwd(z, p):
    val, idx = pool(z, p)
    return (val, idx), (idx, z.shape[1])


def _pool_bwd(p, res, g):
    idx, side = res
    return (unpool(g[0], idx, p, side),)


pool.defvjp(_pool_fwd, _pool_bwd)


def unpool(v, idx, p: int, side: int):
    """Unpool(v, idx): each value back at its argmax position, zeros elsewhere, on a
    ``side × side`` map (rows/columns that pooling dropped stay 0)."""
    b, hp, wp, c = v.shape
    hot = idx[..., None] == jnp.arange(p * p, dtype=idx.dtype)
    z = jnp.where(hot, v[..., None], jnp.zeros((), v.dtype))
    z = z.reshape(b, hp, wp, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(b, hp * p, wp * p, c)
    if hp * p != side or wp * p != side:
        z = jnp.pad(z, ((0, 0), (0, side - hp * p), (0, side - wp * p), (0, 0)))
    return z


# ----- the unroll setting -----------------------------------------------------------------------
#: environment variable: steps per loop iteration of every phase (a positive integer, or
#: ``full``: no loop at all); unset, :meth:`JaxOps.unroll`'s defaults
UNROLL_ENV = "EPBENCH_JAX_UNROLL"

#: what ``full`` unrolls to: more than any phase's step count (:meth:`JaxOps.fori` clamps it to n)
FULL_UNROLL = 2 ** 31 - 1


def unroll_setting() -> int | str | None:
    """``EPBENCH_JAX_UNROLL`` as read now: None (unset or empty: the defaults), a positive int,
    or ``"full"``; any other value raises :class:`~epbench.errors.EpbenchError`. It is read
    when a program is traced (compiled), not when it runs."""
    raw = os.environ.get(UNROLL_ENV, "").strip()
    if not raw:
        return None
    if raw.lower() == "full":
        return "full"
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise EpbenchError(f"{UNROLL_ENV}={raw!r}: expected a positive integer (steps per loop iteration) "
                       "or 'full' (no loop), or leave it unset for the defaults")


def unroll_label() -> str:
    """The suffix of the backend's implementation label for the current setting:
    ``:unroll=N`` / ``:unroll=full``, or ``""`` when the variable is unset."""
    setting = unroll_setting()
    return "" if setting is None else f":unroll={setting}"


# ----- the Ops ------------------------------------------------------------------------------------
def _restructured(pullback, out):
    """``pullback`` taking a cotangent of any sequence type (tuple or list) for the primal
    output ``out``: the core's states are sequences, jax.vjp wants the exact pytree."""
    tree = jax.tree.structure(out)

    def pull(ct):
        return pullback(jax.tree.unflatten(tree, jax.tree.leaves(ct)))

    return pull


class JaxOps(Ops):
    """Loop combinators that trace into one XLA program: ``lax.fori_loop``, ``lax.scan``,
    ``lax.cond``, ``jax.vmap`` / ``lax.map``; trees are JAX pytrees (``None`` an empty subtree);
    products at ``Precision.HIGHEST``; feature maps channels-last."""

    xp = jnp
    prefers_split_sweep = True
    vectorizes_maps = True

    @staticmethod
    def vjp(f, *primals, has_aux: bool = False):
        """``jax.vjp`` (``(out, pullback[, aux])``); the pullback takes the cotangent as any
        sequence type of the same leaves."""
        res = jax.vjp(f, *primals, has_aux=has_aux)
        return (res[0], _restructured(res[1], res[0]), *res[2:])

    def unroll(self, spec, free: bool) -> int:
        """Steps per loop iteration of a phase. By default, free phases: 4 (2 for pconv, whose
        steps are large); nudged: 1. ``EPBENCH_JAX_UNROLL=N`` (:func:`unroll_setting`): N for
        every phase; ``full``: every phase fully unrolled (no loop)."""
        setting = unroll_setting()
        if setting == "full":
            return FULL_UNROLL
        if setting is not None:
            return setting
        return (2 if spec.kind == "pconv" else 4) if free else 1

    def pullback_stacked(self, pullback, cotangents, batched: bool = True):
        """``jax.vmap(pullback)`` over the leading axis when ``batched``, else ``lax.map``."""
        return self.map(pullback, cotangents, batched=batched)

    # ----- activations ----------------------------------------------------------------------------
    def clip01(self, v):
        """clip(v, 0, 1), derivative 1 on 0 ≤ v ≤ 1 inclusive (as ``torch.clamp``)."""
        return jnp.where(v < 0, jnp.zeros_like(v), jnp.where(v > 1, jnp.ones_like(v), v))

    # ----- products ---------------------------------------------------------------------------------
    def matmul(self, a, b):
        """a @ b at full precision."""
        return mm(a, b)

    def linear(self, x, w, b=None):
        """x Wᵀ (+ b)."""
        out = mm(x, w.T)
        return out if b is None else out + b

    def matmul_add(self, c, a, b):
        """c + a @ b."""
        return c + mm(a, b)

    def add_scaled(self, s, d, h: float):
        """s + h·d."""
        return s + h * d

    # ----- feature maps (B, H, W, C) ---------------------------------------------------------------
    def maps_from_canonical(self, a):
        """(..., C, H, W) → (..., H, W, C)."""
        return jnp.moveaxis(a, -3, -1)

    def maps_to_canonical(self, z):
        """(..., H, W, C) → (..., C, H, W)."""
        return jnp.moveaxis(z, -1, -3)

    def map_shape(self, chw):
        c, h, w = chw
        return (h, w, c)

    def flatten_maps(self, z):
        """(B, H, W, C) → (B, C·H·W) in the canonical (C, H, W) order."""
        return jnp.reshape(self.maps_to_canonical(z), (z.shape[0], -1))

    def unflatten_maps(self, v, chw):
        """(B, C·H·W) in the canonical order → (B, H, W, C)."""
        return self.maps_from_canonical(jnp.reshape(v, (v.shape[0], *chw)))

    def channel_sum(self, z):
        """Σ over batch and space: (C,)."""
        return jnp.sum(z, axis=(0, 1, 2))

    def conv_kernel(self, w):
        """OIHW W → (wc, wt): :func:`conv_matrix` as (k, k, C_in, C_out) and :func:`conv_t_matrix`
        as (C_out, k, k, C_in) (the products reshape them to matrices for free; the 4-d shapes
        carry k and the channel counts)."""
        o, c, k, _ = w.shape
        return conv_matrix(w).reshape(k, k, c, o), conv_t_matrix(w).reshape(o, k, k, c)

    def conv2d(self, z, kernel, b=None):
        """Conv(z, W)[b,m,n,o] = Σ_{c,r,q} W[o,c,r,q] z[b,m+r,n+q,c] (+ b_o), valid, stride 1 (eq. 74)."""
        wc = kernel[0]
        k, _, c, o = wc.shape
        out = conv_mat(z, wc.reshape(k * k * c, o), k)
        return out if b is None else out + b

    def conv_transpose2d(self, z, kernel):
        """ConvT(z, W)[b,i,j,c] = Σ_{o,r,q} W[o,c,r,q] z[b,i−r,j−q,o]: the adjoint of Conv(·, W) (eq. 75)."""
        wt = kernel[1]
        o, k, _, c = wt.shape
        return conv_t_mat(z, wt.reshape(o, k * k * c), k)

    def conv2d_weight(self, z, g, w_shape):
        """G[o,c,r,q] = Σ_{b,m,n} g[b,m,n,o] z[b,m+r,n+q,c]: the adjoint of W ↦ Conv(z, W), OIHW."""
        return conv_weight_grad(z, g, tuple(w_shape))

    def max_pool(self, z, p: int):
        """(max over each p×p window, its first argmax in row-major order); differentiable (Unpool)."""
        return pool(z, p)

    def max_unpool(self, v, idx, p: int, side: int):
        return unpool(v, idx, p, side)

    # ----- loops and trees --------------------------------------------------------------------------
    def tree_map(self, f, tree, *rest):
        return jax.tree.map(f, tree, *rest)

    def tree_leaves(self, tree) -> list:
        return jax.tree.leaves(tree)

    def fori(self, n: int, body, carry, unroll: int = 1):
        return lax.fori_loop(0, n, lambda _, c: body(c), carry, unroll=max(1, min(unroll, n)))

    def scan(self, body, carry, xs=None, length: int | None = None, reverse: bool = False, first_y=None):
        carry, ys = lax.scan(body, carry, xs, length=length, reverse=reverse)
        return carry, (ys if first_y is None else self.concat_front(first_y, ys))

    def cond(self, pred, true_fn, false_fn, operand):
        return lax.cond(pred, true_fn, false_fn, operand)

    def map(self, f, *xs, batched: bool = True):
        """``jax.vmap`` (one large product per parameter) when ``batched``, else ``lax.map``
        (a loop: pconv, whose per-step products are already large and batch poorly)."""
        if batched:
            return jax.vmap(f)(*xs)
        return lax.map(lambda a: f(*a), xs)

    def stack(self, trees: list):
        if not trees or trees[0] is None:
            return None
        return jax.tree.map(lambda *a: jnp.stack(a), *trees)

    def concat_front(self, first, rest):
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b], 0), first, rest)


OPS = JaxOps()
