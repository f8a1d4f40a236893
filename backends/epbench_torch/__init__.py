"""PyTorch backend of epbench (``torch-cpu``, ``torch-cuda``).

* :mod:`epbench_torch.models`: the dynamics (explicit step functions, Φ, ∂Φ/∂θ);
* :mod:`epbench_torch.algorithms`: first/nudged phases, EP update, BPTT (Prop. 4), GDU processes;
* :mod:`epbench_torch.backend`: :class:`TorchBackend`, the :class:`epbench.backend.Backend` contract.

Importing this package does not import torch.
"""

from epbench_torch.backend import TorchBackend

__all__ = ["TorchBackend"]
