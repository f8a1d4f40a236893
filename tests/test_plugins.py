"""The plugin manager (epbench.plugins): hooks are called through pluggy, one plugin at a time, so
that pluggy's hook-call monitoring traces every call, a failing plugin is isolated and what each
plugin registers is attributed to it. (The same behaviour through real installed entry points
and the command line: tests/test_cli.py.)"""

from __future__ import annotations

import sys
import types
import warnings
from importlib import metadata

import pytest

from epbench import hookimpl, plugins
from epbench.errors import EpbenchError


class Item:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Item({self.name!r})"


def _module(monkeypatch, name: str, **hooks) -> metadata.EntryPoint:
    """A plugin module ``name`` implementing ``hooks`` (hook name -> function), importable
    through its entry point."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        function.__name__ = hook_name
        setattr(module, hook_name, hookimpl(function))
    monkeypatch.setitem(sys.modules, name, module)
    return metadata.EntryPoint(name.removeprefix("epbench_test_"), name, plugins.GROUP)


def _broken():
    raise RuntimeError("cannot list backends")


@pytest.fixture
def entry_points(monkeypatch):
    """Three test plugins: ``alpha`` registers a backend and a dataset, ``broken`` raises in
    its backends hook, ``copy`` registers a backend under alpha's name and one of its own."""
    monkeypatch.delenv("EPBENCH_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("EPBENCH_DISABLE_PLUGINS", raising=False)
    eps = [
        _module(monkeypatch, "epbench_test_alpha", epbench_backends=lambda: [Item("alpha-cpu")],
                epbench_datasets=lambda: [Item("alpha-data")]),
        _module(monkeypatch, "epbench_test_broken", epbench_backends=_broken),
        _module(monkeypatch, "epbench_test_copy", epbench_backends=lambda: [Item("alpha-cpu"), Item("copy-cpu")]),
    ]
    monkeypatch.setattr(plugins, "_entry_points", lambda: eps)
    return eps


def test_each_plugin_registers_its_own_and_a_failing_one_is_skipped(entry_points):
    with pytest.warns(plugins.PluginWarning) as caught:
        reg = plugins.build_registry(strict=False)
    messages = [str(w.message) for w in caught]
    assert any("'broken' failed in epbench_backends: RuntimeError: cannot list backends" in m for m in messages)
    assert any("'copy' registers a duplicate entry 'alpha-cpu'" in m for m in messages)
    assert set(reg.backends) == {"alpha-cpu", "copy-cpu"} and set(reg.datasets) == {"alpha-data"}
    info = {i.entry_point: i for i in reg.plugins}
    assert info["alpha"].registers == ["alpha-cpu", "alpha-data"]
    assert info["copy"].registers == ["copy-cpu"]
    assert info["broken"].registers == [] and "cannot list backends" in info["broken"].error
    assert info["alpha"].hooks == ["epbench_backends", "epbench_datasets"]


def test_strict_makes_a_failing_plugin_an_error(entry_points):
    with pytest.raises(EpbenchError, match="'broken' failed in epbench_backends"):
        plugins.build_registry(strict=True)


def test_strict_rejects_a_duplicate(entry_points, monkeypatch):
    entry_points.remove(next(ep for ep in entry_points if ep.name == "broken"))
    with pytest.raises(EpbenchError, match="'copy' registers a duplicate entry 'alpha-cpu'"):
        plugins.build_registry(strict=True)


def test_tracing_shows_pluggys_hook_calls_for_both_hooks(entry_points, monkeypatch, capsys):
    """EPBENCH_TRACE_PLUGINS=1 installs pluggy's hook-call monitoring: a line before each call
    (the hook and the plugin it is called on) and one after (its result, or what it raised)."""
    monkeypatch.setenv("EPBENCH_TRACE_PLUGINS", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", plugins.PluginWarning)
        plugins.build_registry(strict=False)
    err = capsys.readouterr().err.splitlines()
    for plugin in ("alpha", "broken", "copy"):
        assert f"[epbench trace] call epbench_backends({{}}) -> implementations: {plugin}" in err
    assert "[epbench trace] call epbench_datasets({}) -> implementations: alpha" in err
    assert "[epbench trace] epbench_backends returned [[Item('alpha-cpu')]]" in err
    assert "[epbench trace] epbench_datasets returned [[Item('alpha-data')]]" in err
    assert "[epbench trace] epbench_backends raised RuntimeError('cannot list backends')" in err
