"""Registers the PyTorch backends (``torch-cpu``, ``torch-cuda``). Cheap to import: no torch here."""

from epbench import hookimpl

from epbench_torch.backend import TorchBackend


@hookimpl
def epbench_backends():
    return [TorchBackend("cpu"), TorchBackend("cuda")]
