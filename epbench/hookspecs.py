"""Pluggy hook specifications: how a package (built-in or third party) plugs into epbench.

A plugin is a module listed under the ``epbench`` entry-point group, e.g. in its
``pyproject.toml``::

    [project.entry-points.epbench]
    mybackend = "mypkg.plugin"

and implementing any of the hooks below with ``@epbench.hookimpl``. The module must be cheap
to import: import heavy frameworks inside the backend's methods, not at module level.
"""

from __future__ import annotations

import pluggy

PROJECT = "epbench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def epbench_backends() -> list:
    """Return a list of :class:`epbench.backend.Backend` instances to register by their
    ``name``. Names must be unique across all plugins."""


@hookspec
def epbench_datasets() -> list:
    """Return a list of :class:`epbench.datasets.Dataset` instances to register by name."""


@hookspec
def epbench_algorithms() -> list:
    """Return a list of :class:`epbench.algorithms.Algorithm` instances to register by their
    ``name`` (the built-ins ``ep`` and ``bptt`` are registered this way too)."""


@hookspec
def epbench_models() -> list:
    """Return a list of :class:`epbench.models.Model` instances to register by their ``kind``
    (the built-ins ``toy``, ``eb``, ``p`` and ``pconv`` are registered this way too)."""
