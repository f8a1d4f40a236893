"""The built-in plugin: registers epbench's own datasets, algorithms and models (cheap to import)."""

from __future__ import annotations

from epbench import hookimpl
from epbench.algorithms.bptt import BPTT
from epbench.algorithms.ep import EP
from epbench.datasets.mnist import FashionMnist, Mnist
from epbench.datasets.mnist5k import Mnist5k
from epbench.models.conv import PConv
from epbench.models.dense import EB, P, Toy


@hookimpl
def epbench_datasets():
    return [Mnist5k(), Mnist(), FashionMnist()]


@hookimpl
def epbench_algorithms():
    return [EP(), BPTT()]


@hookimpl
def epbench_models():
    return [Toy(), EB(), P(), PConv()]
