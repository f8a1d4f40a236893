"""epbench-numpy: a pure-NumPy epbench backend (the models with an analytic one-step VJP).

Registered under the name ``numpy`` through the ``epbench`` entry point
``epbench_numpy.plugin``. It implements only the backend primitives (:mod:`epbench.backend`);
the models, phases, EP, BPTT (Prop. 4) and training are the core's. With no automatic
differentiation, the VJP of one step is each model's analytic ``step_vjp``.
"""

__version__ = "0.1.0"
