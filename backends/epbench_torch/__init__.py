"""PyTorch backend of epbench (``torch-cpu``, ``torch-cuda``).

* :mod:`epbench_torch.models`: the dynamics (explicit step functions, Φ, ∂Φ/∂θ);
* :mod:`epbench_torch.dynamics`: the backend primitives of one model on one batch (step, VJP of a step, ∂Φ/∂θ increments);
* :mod:`epbench_torch.backend`: :class:`TorchBackend`, the :class:`epbench.backend.Backend` contract.

Importing this package does not import torch.
"""

from epbench_torch.backend import TorchBackend

__all__ = ["TorchBackend"]
