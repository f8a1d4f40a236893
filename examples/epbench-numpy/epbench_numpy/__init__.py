"""epbench-numpy: a pure-NumPy epbench backend for the fully connected EB and P models.

Registered under the name ``numpy`` through the ``epbench`` entry point
``epbench_numpy.plugin``. Everything, including the BPTT backward sweep (the Prop. 4
recursion), is written out by hand with NumPy: no automatic differentiation.
"""

__version__ = "0.1.0"
