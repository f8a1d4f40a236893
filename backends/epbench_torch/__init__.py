"""PyTorch backend of epbench (``torch-cpu``, ``torch-cuda``).

* :mod:`epbench_torch.ops`: the primitives (autograd VJP, products, NCHW convolutions and pooling);
* :mod:`epbench_torch.backend`: :class:`TorchBackend`, the :class:`epbench.backend.Backend` contract.

Importing this package does not import torch.
"""

from epbench_torch.backend import TorchBackend

__all__ = ["TorchBackend"]
