"""Dynamics of the four model kinds of ``docs/equations.md`` as pure JAX functions.

States are tuples ``(s0, ..., sL)`` of batch-major arrays; parameters are dicts with the
canonical names of :mod:`epbench.spec`. The input-only part of the dynamics (the *drive*, e.g.
``W_{L,x} u + b_L``) depends on θ and x only, so it is computed once per batch by :func:`drive`
and handed to :func:`step`; :func:`drive_names` lists the parameters it uses (the others are
the *step* parameters, used by :func:`step` in their :func:`step_layout` form).

Internal layout: the convolutional layers of pconv are kept channels-last, ``(B, H, W, C)``,
inside the programs (what CPUs multiply fastest); :func:`to_internal` / :func:`to_external`
convert from / to the canonical ``(B, C, H, W)`` of ``spec.state_shapes``. Every other state
and every parameter is in its canonical layout.

Everything here is traced inside ``jax.jit`` programs (see ``dynamics.py``): ``spec`` is a
static Python object, never a traced value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from epbench.spec import ModelSpec

#: full float32 precision for every product (no TF32 on GPUs)
HI = lax.Precision.HIGHEST


# ----- elementary operations ----------------------------------------------------------------
def mm(a, b):
    """Matrix product at full precision."""
    return jnp.matmul(a, b, precision=HI)


def clip01(v):
    """clip(v, 0, 1) whose derivative is 1 on 0 <= v <= 1 inclusive (as ``torch.clamp``)."""
    return jnp.where(v < 0, jnp.zeros_like(v), jnp.where(v > 1, jnp.ones_like(v), v))


def rho(activation: str, v):
    """ρ: sigmoid(v) = 1/(1+exp(−4(v−½))), hard_sigmoid(v) = clip(v, 0, 1), or tanh(v)."""
    if activation == "sigmoid":
        return 1.0 / (1.0 + jnp.exp(-4.0 * (v - 0.5)))
    if activation == "hard_sigmoid":
        return clip01(v)
    if activation == "tanh":
        return jnp.tanh(v)
    raise ValueError(f"unknown activation {activation!r}")


def rho_prime(activation: str, v):
    """ρ': 4σ(1−σ), 1 on [0, 1] (else 0) for hard_sigmoid, 1 − tanh²."""
    if activation == "sigmoid":
        r = rho(activation, v)
        return 4.0 * r * (1.0 - r)
    if activation == "hard_sigmoid":
        return jnp.where((v >= 0) & (v <= 1), jnp.ones_like(v), jnp.zeros_like(v))
    if activation == "tanh":
        t = jnp.tanh(v)
        return 1.0 - t * t
    raise ValueError(f"unknown activation {activation!r}")


# ----- convolutions (channels last) ---------------------------------------------------------
# Written as matrix products over k×k patches: on CPU this beats XLA's own convolutions, and
# the transposes of "patches" and "overlap-add" are each other, so the derivatives are the
# same two products again (custom VJPs; autodiff would expand them into slow pad chains).
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
    """OIHW kernel → the (k·k·C_in, C_out) matrix of :func:`conv_mat`."""
    o, c, k, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(k * k * c, o)


def conv_t_matrix(w):
    """OIHW kernel → the (C_out, k·k·C_in) matrix of :func:`conv_t_mat`."""
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


# ----- layouts ----------------------------------------------------------------------------------
def _is_map(spec: ModelSpec, i: int) -> bool:
    return spec.kind == "pconv" and i > 0


def to_internal(spec: ModelSpec, s) -> tuple:
    """Canonical (…, C, H, W) states → internal (…, H, W, C) (pconv layers 1, 2 only)."""
    return tuple(jnp.moveaxis(v, -3, -1) if _is_map(spec, i) else v for i, v in enumerate(s))


def to_external(spec: ModelSpec, s) -> list:
    """Internal states (any leading axes) → canonical layout."""
    return [jnp.moveaxis(v, -1, -3) if _is_map(spec, i) else v for i, v in enumerate(s)]


def internal_shapes(spec: ModelSpec) -> list[tuple[int, ...]]:
    """Per-sample shapes of the internal states."""
    return [tuple(sh[1:]) + (sh[0],) if _is_map(spec, i) else tuple(sh)
            for i, sh in enumerate(spec.state_shapes)]


def zero_states(spec: ModelSpec, batch: int, dtype) -> tuple:
    """s = 0 for every layer (internal layout)."""
    return tuple(jnp.zeros((batch,) + shape, dtype) for shape in internal_shapes(spec))


def _w01_hwc(spec: ModelSpec, w01):
    """W01 with its columns in the (H, W, C) order of the internal flat(s1)."""
    c, p, _ = spec.state_shapes[1]
    return w01.reshape(-1, c, p, p).transpose(0, 2, 3, 1).reshape(w01.shape[0], -1)


# ----- parameters: drive vs step --------------------------------------------------------------
def drive_names(spec: ModelSpec) -> tuple[str, ...]:
    """Parameters that only act on the input x (folded into the per-batch drive)."""
    L = spec.n_layers - 1
    if spec.kind == "toy":
        names = ["W0x", "W1x"] + (["b0", "b1"] if spec.biases else [])
    elif spec.kind == "pconv":
        names = ["W2x"] + (["b2"] if spec.biases else [])
    else:
        names = [f"W{L}x"] + ([f"b{L}"] if spec.biases else [])
    return tuple(names)


def split_params(spec: ModelSpec, params: dict) -> tuple[dict, dict]:
    """(step parameters, drive parameters)."""
    dn = set(drive_names(spec))
    return ({k: v for k, v in params.items() if k not in dn}, {k: v for k, v in params.items() if k in dn})


def step_layout(spec: ModelSpec, ps: dict) -> dict:
    """The step parameters as :func:`step` uses them, computed once per batch outside the time
    loops (XLA does not hoist such copies out of loops): for pconv, W12 as its two kernel
    matrices and W01 with columns in the internal order. A linear map of θ_step."""
    if spec.kind != "pconv":
        return ps
    out = dict(ps)
    out["W12"] = (conv_matrix(ps["W12"]), conv_t_matrix(ps["W12"]))
    out["W01"] = _w01_hwc(spec, ps["W01"])
    return out


def input_of(spec: ModelSpec, x):
    """u = ρ(x) if spec.sigma_on_input (eq. 70) else x; pconv: (B, H, W, 1)."""
    x = x.reshape((x.shape[0],) + tuple(spec.input_shape))
    if spec.kind == "pconv":
        x = jnp.moveaxis(x, 1, -1)
    return rho(spec.activation, x) if spec.sigma_on_input else x


def drive(spec: ModelSpec, pd: dict, u):
    """Input drive per layer (``None`` where there is none) and the auxiliary pooling indices.

    toy: d0 = W0x u + b0, d1 = W1x u + b1; eb/p: d_L = W_{L,x} u + b_L;
    pconv: d2 = Pool(Conv(u, W2x) + b2) and its argmax indices idx2 (constant per batch)."""
    L = spec.n_layers - 1
    d = [None] * spec.n_layers
    aux = None
    if spec.kind == "toy":
        d[0] = mm(u, pd["W0x"].T)
        d[1] = mm(u, pd["W1x"].T)
        if spec.biases:
            d[0] = d[0] + pd["b0"]
            d[1] = d[1] + pd["b1"]
    elif spec.kind == "pconv":
        c = conv(u, pd["W2x"])
        if spec.biases:
            c = c + pd["b2"]
        d[2], aux = pool(c, spec.pool)
    else:
        d[L] = mm(u, pd[f"W{L}x"].T)
        if spec.biases:
            d[L] = d[L] + pd[f"b{L}"]
    return tuple(d), aux


# ----- one step -------------------------------------------------------------------------------
def _pre_layered(spec: ModelSpec, ps: dict, d, r, layers=None):
    """pre_i = W_{i,i+1} r_{i+1} + W_{i−1,i}ᵀ r_{i−1} + d_i + b_i (layered eb/p; r = ρ(s) or s),
    for every layer, or only for those in ``layers`` (the others are ``None``)."""
    L = spec.n_layers - 1
    pre = [None] * (L + 1)
    for i in range(L + 1) if layers is None else layers:
        p = d[i] if i == L else mm(r[i + 1], ps[f"W{i}{i + 1}"].T)
        if i > 0:
            p = p + mm(r[i - 1], ps[f"W{i - 1}{i}"])
        if spec.biases and i < L:
            p = p + ps[f"b{i}"]
        pre[i] = p
    return pre


def pconv_pre(spec: ModelSpec, ps: dict, d, s):
    """pre_0 = W01 flat(s1) + b0; pre_1 = Pool(Conv(s2, W12) + b1) + unflat(W01ᵀ s0);
    pre_2 = d2 + ConvT(Unpool(s1, idx1), W12) (appendix C.7, Lemma 5); ``ps`` in the
    :func:`step_layout` form, states internal."""
    s0, s1, s2 = s
    B = s0.shape[0]
    k = spec.kernel
    w_conv, w_conv_t = ps["W12"]
    c1 = conv_mat(s2, w_conv, k)
    if spec.biases:
        c1 = c1 + ps["b1"]
    pool1, idx1 = pool(c1, spec.pool)
    pre0 = mm(s1.reshape(B, -1), ps["W01"].T)
    if spec.biases:
        pre0 = pre0 + ps["b0"]
    pre1 = pool1 + mm(s0, ps["W01"]).reshape(s1.shape)
    pre2 = d[2] + conv_t_mat(unpool(s1, idx1, spec.pool, c1.shape[1]), w_conv_t, k)
    return [pre0, pre1, pre2]


def half_step(spec: ModelSpec, ps: dict, d, s, parity: int, nudge=None):
    """Update only the layers i ≡ parity (mod 2) of a P model (the others keep their state);
    the nudge β(y − s0) goes with layer 0 (PhaseSettings.alternate, appendix C.6)."""
    layers = range(parity, spec.n_layers, 2)
    pre = _pre_layered(spec, ps, d, s, layers)
    ds = {i: -s[i] + rho(spec.activation, pre[i]) for i in layers}
    if nudge is not None and 0 in ds:
        beta, y = nudge
        ds[0] = ds[0] + beta * (y - s[0])
    new = list(s)
    for i, di in ds.items():
        new[i] = s[i] + spec.step * di
        if spec.clamp:
            new[i] = clip01(new[i])
    return tuple(new)


def double_step(spec: ModelSpec, ps: dict, d, s, nudge=None):
    """Two time steps of the alternated P dynamics at the cost of one synchronous step: odd
    layers then even layers (free; ends on s0, so s0 follows the synchronous s0 exactly), or
    even layers with the nudge then odd layers (nudged phase)."""
    if nudge is None:
        return half_step(spec, ps, d, half_step(spec, ps, d, s, 1), 0)
    return half_step(spec, ps, d, half_step(spec, ps, d, s, 0, nudge), 1)


def dsdt(spec: ModelSpec, ps: dict, d, s):
    """dsdt_i(s) of every kind (no nudge): EB/toy −s_i + g_i ⊙ pre_i, P/pconv −s_i + ρ(pre_i)."""
    act = spec.activation
    if spec.kind == "toy":
        r0, r1 = rho(act, s[0]), rho(act, s[1])
        pre = [d[0] + mm(r1, ps["W01"].T), d[1] + mm(r0, ps["W01"])]
        return [-s[i] + rho_prime(act, s[i]) * pre[i] for i in range(2)]
    if spec.kind == "eb":
        pre = _pre_layered(spec, ps, d, [rho(act, si) for si in s])
        out = []
        for i, (si, pi) in enumerate(zip(s, pre)):
            out.append(-si + (rho_prime(act, si) * pi if (i > 0 or spec.output_sigma_prime) else pi))
        return out
    pre = _pre_layered(spec, ps, d, list(s)) if spec.kind == "p" else pconv_pre(spec, ps, d, s)
    return [-si + rho(act, pi) for si, pi in zip(s, pre)]


def step(spec: ModelSpec, ps: dict, d, s, nudge=None):
    """One synchronous step s_i ← s_i + h·dsdt_i(s), then clip(s_i, 0, 1) if spec.clamp.
    ``nudge = (β, y)`` adds β(y − s0) to dsdt_0 (nudged phase, eq. 35). ``ps``: the step
    parameters in the :func:`step_layout` form; states internal."""
    h = spec.step
    ds = dsdt(spec, ps, d, s)
    if nudge is not None:
        beta, y = nudge
        ds[0] = ds[0] + beta * (y - s[0])
    new = [si + h * di for si, di in zip(s, ds)]
    if spec.clamp:
        new = [clip01(v) for v in new]
    return tuple(new)


# ----- Φ and ∂Φ/∂θ ------------------------------------------------------------------------------
def _bsum(v):
    return jnp.sum(v)


def phi(spec: ModelSpec, params: dict, u, s):
    """Φ(x, s, θ) summed over the batch (eqs 70, 72, appendix C.2 and C.7); states internal."""
    ps, pd = split_params(spec, params)
    d, _ = drive(spec, pd, u)
    act, h = spec.activation, spec.step
    if spec.kind in ("toy", "eb"):
        r = [rho(act, si) for si in s]
        if spec.kind == "toy":
            coupling = _bsum(r[0] * mm(r[1], ps["W01"].T)) + _bsum(r[0] * d[0]) + _bsum(r[1] * d[1])
        else:
            L = spec.n_layers - 1
            coupling = sum(_bsum(r[i] * mm(r[i + 1], ps[f"W{i}{i + 1}"].T)) for i in range(L))
            coupling = coupling + _bsum(r[L] * d[L])
            if spec.biases:
                coupling = coupling + sum(_bsum(ps[f"b{i}"] * r[i]) for i in range(L))
        return (1.0 - h) / 2.0 * sum(_bsum(si * si) for si in s) + h * coupling
    if spec.kind == "p":
        L = spec.n_layers - 1
        total = sum(_bsum(s[i] * mm(s[i + 1], ps[f"W{i}{i + 1}"].T)) for i in range(L)) + _bsum(s[L] * d[L])
        if spec.biases:
            total = total + sum(_bsum(ps[f"b{i}"] * s[i]) for i in range(L))
        return total
    s0, s1, s2 = s
    B = s0.shape[0]
    c1 = conv(s2, ps["W12"])
    if spec.biases:
        c1 = c1 + ps["b1"]
    pool1, _ = pool(c1, spec.pool)
    t0 = mm(s1.reshape(B, -1), _w01_hwc(spec, ps["W01"]).T)
    if spec.biases:
        t0 = t0 + ps["b0"]
    return _bsum(s0 * t0) + _bsum(s1 * pool1) + _bsum(s2 * d[2])


def dphi(spec: ModelSpec, params: dict, u, aux, s) -> dict:
    """∂Φ/∂θ at the states s (internal), batch-averaged, for every parameter (canonical layout).

    eb/toy: ∂Φ/∂W_{i,j} = h ρ(s_i) ρ(s_j)ᵀ (ρ(s_j) → u for input weights), ∂Φ/∂b_i = h ρ(s_i);
    p: the same without ρ and h; pconv: ∂Φ/∂W01 = s0 flat(s1)ᵀ, ∂Φ/∂W12 (∂Φ/∂W2x) is the weight
    transpose of Conv(s2, ·) (Conv(u, ·)) applied to Unpool(s1, idx1) (Unpool(s2, idx2)), with
    idx1 the argmax positions of the current state and idx2 = ``aux`` (fixed by x)."""
    B = s[0].shape[0]
    out = {}
    if spec.kind == "pconv":
        s0, s1, s2 = s
        c1 = conv(s2, params["W12"])
        if spec.biases:
            c1 = c1 + params["b1"]
        _, idx1 = pool(c1, spec.pool)
        g1 = unpool(s1, idx1, spec.pool, c1.shape[1])
        g2 = unpool(s2, aux, spec.pool, u.shape[1] - spec.kernel + 1)
        c, p, _ = spec.state_shapes[1]
        w01 = mm(s0.T, s1.reshape(B, -1)).reshape(-1, p, p, c).transpose(0, 3, 1, 2)
        out["W01"] = w01.reshape(s0.shape[1], -1) / B
        out["W12"] = conv_weight_grad(s2, g1, params["W12"].shape) / B
        out["W2x"] = conv_weight_grad(u, g2, params["W2x"].shape) / B
        if spec.biases:
            out["b0"] = jnp.sum(s0, 0) / B
            out["b1"] = jnp.sum(s1, (0, 1, 2)) / B
            out["b2"] = jnp.sum(s2, (0, 1, 2)) / B
        return out
    if spec.kind == "toy":
        r = [rho(spec.activation, si) for si in s]
        c = spec.step / B
        out["W01"] = mm(r[0].T, r[1]) * c
        out["W0x"] = mm(r[0].T, u) * c
        out["W1x"] = mm(r[1].T, u) * c
        if spec.biases:
            out["b0"] = jnp.sum(r[0], 0) * c
            out["b1"] = jnp.sum(r[1], 0) * c
        return out
    L = spec.n_layers - 1
    if spec.kind == "eb":
        r, c = [rho(spec.activation, si) for si in s], spec.step / B
    else:
        r, c = list(s), 1.0 / B
    for i in range(L):
        out[f"W{i}{i + 1}"] = mm(r[i].T, r[i + 1]) * c
    out[f"W{L}x"] = mm(r[L].T, u) * c
    if spec.biases:
        for i in range(L + 1):
            out[f"b{i}"] = jnp.sum(r[i], 0) * c
    return out


def _cross_increment(a, a_prev, b, b_prev):
    """aᵀb − a_prevᵀb_prev as one product, [Δa; a_prev]ᵀ [b; Δb] (exactly 0 when nothing moved)."""
    return mm(jnp.concatenate([a - a_prev, a_prev], 0).T, jnp.concatenate([b, b - b_prev], 0))


def dphi_increment(spec: ModelSpec, params: dict, u, aux, s, s_prev, s_at=None, prev_at=None) -> dict:
    """∂Φ/∂θ(s) − ∂Φ/∂θ(s_prev) (batch-averaged, canonical layout; states internal), written
    with the increments s − s_prev so that it is exactly 0 when s = s_prev and free of the
    cancellation of two large nearly equal terms. Same quantities as :func:`dphi`; for pconv,
    the argmax positions idx1 of s are those of the state ``s_at``, of s_prev those of
    ``prev_at`` (by default each state's own, Lemma 5; the official-code flavour passes the
    previous states, ``ModelSpec.late_pool_indices``)."""
    B = s[0].shape[0]
    out = {}
    if spec.kind == "pconv":
        (s0, s1, s2), (q0, q1, q2) = s, s_prev

        def g1_of(a1, a2):
            c1 = conv(a2, params["W12"])
            if spec.biases:
                c1 = c1 + params["b1"]
            return unpool(a1, pool(c1, spec.pool)[1], spec.pool, c1.shape[1])

        g1 = g1_of(s1, (s if s_at is None else s_at)[2])
        g1p = g1_of(q1, (s_prev if prev_at is None else prev_at)[2])
        k, (o, c, _, _) = spec.kernel, params["W12"].shape
        w12 = mm(jnp.concatenate([_patches(s2 - q2, k), _patches(q2, k)], 0).T,
                 jnp.concatenate([g1.reshape(-1, o), (g1 - g1p).reshape(-1, o)], 0))
        c1s, p, _ = spec.state_shapes[1]
        w01 = _cross_increment(s0, q0, s1.reshape(B, -1), q1.reshape(B, -1))
        out["W01"] = w01.reshape(-1, p, p, c1s).transpose(0, 3, 1, 2).reshape(s0.shape[1], -1) / B
        out["W12"] = w12.reshape(k, k, c, o).transpose(3, 2, 0, 1) / B
        g2 = unpool(s2 - q2, aux, spec.pool, u.shape[1] - spec.kernel + 1)
        out["W2x"] = conv_weight_grad(u, g2, params["W2x"].shape) / B
        if spec.biases:
            out["b0"] = jnp.sum(s0 - q0, 0) / B
            out["b1"] = jnp.sum(s1 - q1, (0, 1, 2)) / B
            out["b2"] = jnp.sum(s2 - q2, (0, 1, 2)) / B
        return out
    if spec.energy_based:
        r, rp, c = [rho(spec.activation, v) for v in s], [rho(spec.activation, v) for v in s_prev], spec.step / B
    else:
        r, rp, c = list(s), list(s_prev), 1.0 / B
    if spec.kind == "toy":
        out["W01"] = _cross_increment(r[0], rp[0], r[1], rp[1]) * c
        out["W0x"] = mm((r[0] - rp[0]).T, u) * c
        out["W1x"] = mm((r[1] - rp[1]).T, u) * c
    else:
        L = spec.n_layers - 1
        for i in range(L):
            out[f"W{i}{i + 1}"] = _cross_increment(r[i], rp[i], r[i + 1], rp[i + 1]) * c
        out[f"W{L}x"] = mm((r[L] - rp[L]).T, u) * c
    if spec.biases:
        for i in range(spec.n_layers):
            out[f"b{i}"] = jnp.sum(r[i] - rp[i], 0) * c
    return out
