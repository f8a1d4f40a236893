"""The built-in plugin: registers epbench's own datasets (cheap to import)."""

from __future__ import annotations

from epbench import hookimpl
from epbench.datasets.mnist import FashionMnist, Mnist
from epbench.datasets.mnist5k import Mnist5k


@hookimpl
def epbench_datasets():
    return [Mnist5k(), Mnist(), FashionMnist()]
