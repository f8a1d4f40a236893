"""Models: energy-based and prototypical networks as values registered through the
``epbench_models`` hook, the built-ins (``toy``, ``eb``, ``p``, ``pconv``) exactly like
third-party ones (:mod:`epbench.builtin_plugin`).

A model is written once, against the array namespace ``ops.xp`` (the Python Array API standard
through ``array-api-compat``) and the few operations the standard lacks, which the backend's
:class:`~epbench.ops.Ops` supplies (``matmul``, ``linear``, convolutions and pooling on feature
maps). It declares its states and parameters (names, shapes), its input drive and its step, Φ
and ∂Φ/∂θ; :class:`~epbench.models.dynamics.ModelDynamics` turns it into the primitives the
algorithms use on every backend (the VJP of one step from the backend's autodiff, or from the
model's own ``step_vjp`` on a backend without one, such as NumPy).

Every model is a discrete-time system ``s_{t+1} = s_t + dt·dsdt(s_t)`` (then the clamp to
[0, 1] with ``spec.clamp``); the nudged phase adds ``β(y − s0)`` to ``dsdt_0`` (appendix eq. 35).
"""

from __future__ import annotations

from typing import Any, ClassVar


class Model:
    """Base class of a model (subclass it; the methods below are its whole contract).

    ``spec`` is the :class:`~epbench.spec.ModelSpec` (sizes, activation, dt, flavour, clamp);
    parameters are dicts of arrays with the canonical names of :meth:`param_shapes`; states
    are sequences ``(s0, ..., sL)``, ``s0`` the output layer, in the backend's layout
    (:meth:`internal`/:meth:`external` convert feature maps)."""

    #: the ``ModelSpec.kind`` it is registered under
    kind: ClassVar[str] = ""
    #: one line for ``epbench plugins`` and the reports
    summary: ClassVar[str] = ""
    #: F = ∂Φ/∂s-type model (EB, toy): EP divides by dt·β and Theorem 1 applies; else prototypical
    energy_based: ClassVar[bool] = False
    #: per-time-step work batches well over time (dense products): algorithms may map over t
    batches_over_time: ClassVar[bool] = True
    #: uses the feature-map operations of ``ops`` (convolutions, pooling)
    uses_feature_maps: ClassVar[bool] = False

    # ----- structure -----------------------------------------------------------------------
    def validate(self, spec) -> None:
        """Raise ``ValueError`` (one line) if ``spec`` is not a valid instance of this model."""

    def input_shape(self, spec) -> tuple[int, ...]:
        return (spec.n_in,)

    def state_shapes(self, spec) -> list[tuple[int, ...]]:
        """Per-sample shape of each state layer s0..sL."""
        raise NotImplementedError

    def param_shapes(self, spec) -> dict[str, tuple[int, ...]]:
        """Canonical parameter names and shapes."""
        raise NotImplementedError

    def param_layer(self, spec, name: str) -> int:
        """The layer a parameter drives (its learning rate's layer): the first index of its name
        (``W{i}{j}``, ``W{i}_{j}``, ``b{i}``)."""
        from epbench.spec import layer_of_name

        return layer_of_name(name)

    def init_params(self, spec, seed: int) -> dict:
        """Initial parameters (NumPy float64) from a seed, the same on every backend. The default
        is :func:`epbench.params.init_params`: Glorot-uniform weights (paper flavour) or
        PyTorch's defaults with biases (official-code flavour), drawn in the order of
        :meth:`param_shapes`."""
        from epbench.params import init_params

        return init_params(spec, seed)

    def default_dt(self, spec) -> float:
        """dt when the spec gives none."""
        return 1.0

    def flops(self, spec) -> tuple[float, float, float, float]:
        """Per sample: (input drive, one step, one ∂Φ/∂θ evaluation, its input-side part), in
        FLOPs of matrix products and convolutions (2 per multiply-add)."""
        raise NotImplementedError

    def describe(self, spec) -> str:
        arch = "-".join(str(n) for n in (spec.n_in, *reversed(spec.hidden), spec.n_out))
        return f"{spec.kind} {arch} {spec.activation} dt={spec.step:g} {spec.flavor}"

    def example_spec(self) -> dict:
        """A small instance for the conformance kit (:func:`epbench.testing.check_model`,
        :func:`epbench.testing.check_algorithm`): ``ModelSpec`` keyword arguments; the kit adds
        the flavour unless they name one. The default: ``n_in`` 15, ``n_out`` 4 and hidden
        layers (12, 9), or (12,) where the model takes a single hidden layer; on feature maps a
        15×15 input, channels (3, 4) and 3×3 kernels."""
        if self.uses_feature_maps:
            return dict(kind=self.kind, n_in=15 * 15, n_out=4, channels=(3, 4), kernel=3)
        from epbench.spec import ModelSpec

        for hidden in ((12, 9), (12,)):
            spec = dict(kind=self.kind, hidden=hidden, n_in=15, n_out=4)
            try:
                self.validate(ModelSpec.model_construct(**spec))
            except ValueError:
                continue
            return spec
        return spec

    def supports_alternate(self, spec) -> bool:
        """Whether :meth:`step` takes ``layers`` (``PhaseSettings.alternate``)."""
        return False

    # ----- dynamics ------------------------------------------------------------------------
    def prepare(self, ops, spec, params: dict, x) -> tuple[dict, Any]:
        """Per-batch work, once before the time loops: ``(inputs, ctx)``. ``inputs`` is what
        :meth:`step` differentiates through (the parameters it uses, in any form, and the input
        drives), a differentiable function of ``params``; ``ctx`` what it does not (e.g. u,
        pooling indices of the input drive)."""
        raise NotImplementedError

    def step(self, ops, spec, inputs: dict, ctx, s, nudge=None, layers=None):
        """One step ``s_i + dt·dsdt_i(s)`` (the nudge ``β(y − s0)`` added to ``dsdt_0`` for
        ``nudge = (β, y)``), then the clamp; ``layers``: update only those (alternation)."""
        raise NotImplementedError

    def zeros(self, ops, spec, batch: int, like) -> list:
        """s = 0 in the internal layout, in the dtype and device of ``like``."""
        xp = ops.xp
        return [xp.zeros((batch, *shape), dtype=like.dtype, device=_device(xp, like))
                for shape in self.internal_shapes(ops, spec)]

    def internal_shapes(self, ops, spec) -> list[tuple[int, ...]]:
        return list(self.state_shapes(spec))

    def internal(self, ops, spec, s) -> list:
        """States from the canonical layout (feature maps: ``ops.maps_from_canonical``)."""
        return list(s)

    def external(self, ops, spec, s) -> list:
        """States (any leading axes) to the canonical layout."""
        return list(s)

    def phi(self, ops, spec, params: dict, x, s):
        """Φ(x, s, θ) summed over the batch (0-d)."""
        raise NotImplementedError

    def dphi_increment(self, ops, spec, params: dict, ctx, s, q, s_at=None, q_at=None, scale=1.0) -> dict:
        """(∂Φ/∂θ(s) − ∂Φ/∂θ(q)) / scale, batch-averaged, for every parameter (canonical
        layout), formed from the increments; ``s_at``/``q_at``: the states whose pooling argmax
        positions to use (``ModelSpec.late_pool_indices``; by default each state's own)."""
        raise NotImplementedError

    #: optional: the analytic VJP of one step, for backends without autodiff
    step_vjp = None


def _device(xp, like):
    try:
        from array_api_compat import device

        return device(like)
    except Exception:  # noqa: BLE001 - namespaces without devices
        return None
