"""Plugin manager: loads the ``epbench`` entry points and builds the backend, dataset,
algorithm and model registries from the hooks.

* a broken third-party entry point warns and is skipped (``strict=True``, or
  ``EPBENCH_STRICT_PLUGINS=1``, makes it an error);
* ``EPBENCH_DISABLE_PLUGINS=1`` loads only the built-in plugins (those shipped in the
  ``epbench`` distribution itself);
* ``EPBENCH_TRACE_PLUGINS=1`` prints every hook call (pluggy's hook-call monitoring: the
  hook, its implementations, its result) to stderr.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import warnings
from functools import lru_cache
from importlib import metadata

import pluggy

from epbench import hookspecs
from epbench.errors import EpbenchError

GROUP = "epbench"
#: distributions whose entry points count as built in
BUILTIN_DISTS = {"epbench"}


class PluginWarning(UserWarning):
    pass


@dataclasses.dataclass
class PluginInfo:
    entry_point: str
    module: str
    distribution: str
    version: str
    hooks: list[str]
    registers: list[str]
    error: str = ""


@dataclasses.dataclass
class Registry:
    pm: pluggy.PluginManager
    plugins: list[PluginInfo]
    backends: dict
    datasets: dict
    algorithms: dict
    models: dict

    def backend(self, name: str):
        if name not in self.backends:
            raise EpbenchError(unknown_name_message("backend", name, self.backends))
        return self.backends[name]

    def model(self, kind: str):
        if kind not in self.models:
            raise ValueError(unknown_name_message("model kind", kind, self.models))
        return self.models[kind]

    def algorithm(self, name: str):
        if name not in self.algorithms:
            raise EpbenchError(unknown_name_message("algorithm", name, self.algorithms))
        return self.algorithms[name]

    def dataset(self, name: str):
        if name not in self.datasets:
            raise EpbenchError(unknown_name_message("dataset", name, self.datasets))
        return self.datasets[name]


def unknown_name_message(what: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{name}'{hint} (known: {', '.join(sorted(known)) or 'none'})"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _entry_points():
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def _dist_of(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "", ""
    return dist.metadata["Name"] or "", dist.version or ""


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name, hook_impls, kwargs):
        names = ", ".join(pm.get_name(impl.plugin) or "?" for impl in hook_impls)
        print(f"[epbench trace] call {hook_name}({kwargs}) -> implementations: {names}", file=sys.stderr)

    def after(outcome, hook_name, hook_impls, kwargs):
        if outcome.exception is not None:  # pluggy re-raises it after this report
            print(f"[epbench trace] {hook_name} raised {outcome.exception!r}", file=sys.stderr)
        else:
            print(f"[epbench trace] {hook_name} returned {outcome.get_result()!r}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def build_registry(strict: bool | None = None) -> Registry:
    """Load every plugin and collect what they register (not cached: see :func:`registry`)."""
    if strict is None:
        strict = _env_flag("EPBENCH_STRICT_PLUGINS")
    disable_third_party = _env_flag("EPBENCH_DISABLE_PLUGINS")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if _env_flag("EPBENCH_TRACE_PLUGINS"):
        _trace(pm)
    infos: list[PluginInfo] = []
    for ep in _entry_points():
        dist, version = _dist_of(ep)
        if disable_third_party and dist not in BUILTIN_DISTS:
            continue
        info = PluginInfo(ep.name, ep.value, dist, version, [], [])
        infos.append(info)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
            info.hooks = sorted(h.name for h in pm.get_hookcallers(module) or [])
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break epbench
            info.error = f"{type(exc).__name__}: {exc}"
            if strict:
                raise EpbenchError(f"plugin '{ep.name}' ({ep.value}) failed to load: {info.error}") from exc
            warnings.warn(f"epbench: skipping plugin '{ep.name}' ({ep.value}): {info.error}",
                          PluginWarning, stacklevel=2)
    backends = _collect(pm, "epbench_backends", infos, strict)
    datasets = _collect(pm, "epbench_datasets", infos, strict)
    algorithms = _collect(pm, "epbench_algorithms", infos, strict)
    models = _collect(pm, "epbench_models", infos, strict, key="kind")
    return Registry(pm, infos, backends, datasets, algorithms, models)


def _collect(pm: pluggy.PluginManager, hook_name: str, infos: list[PluginInfo], strict: bool,
             key: str = "name") -> dict:
    """Call ``hook_name`` through pluggy once per implementing plugin (``subset_hook_caller``
    leaving out every other plugin), so that the hook-call monitoring sees every call, one
    failing plugin is isolated, and every registered item is attributed to the plugin that
    registered it. The first plugin (in registration order) to register a name keeps it."""
    by_plugin = {info.entry_point: info for info in infos}
    hook = getattr(pm.hook, hook_name)
    plugins = [impl.plugin for impl in hook.get_hookimpls()]
    found: dict = {}
    for plugin in plugins:
        plugin_name = pm.get_name(plugin)
        info = by_plugin.get(plugin_name)
        call = pm.subset_hook_caller(hook_name, remove_plugins=[p for p in plugins if p is not plugin])
        try:
            items = [item for result in call() for item in (result or [])]
        except Exception as exc:  # noqa: BLE001
            message = f"plugin '{plugin_name}' failed in {hook_name}: {type(exc).__name__}: {exc}"
            if strict:
                raise EpbenchError(message) from exc
            warnings.warn(f"epbench: {message}", PluginWarning, stacklevel=2)
            if info:
                info.error = message
            continue
        for item in items:
            name = getattr(item, key, "")
            if not name or name in found:
                message = f"plugin '{plugin_name}' registers {'a duplicate' if name else 'an unnamed'} entry '{name}'"
                if strict:
                    raise EpbenchError(message)
                warnings.warn(f"epbench: {message}; ignored", PluginWarning, stacklevel=2)
                continue
            found[name] = item
            if info:
                info.registers.append(name)
    return found


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return build_registry()


def get_backend(name: str):
    return registry().backend(name)


def get_dataset(name: str):
    return registry().dataset(name)


def get_algorithm(name: str):
    return registry().algorithm(name)


def get_model(kind: str):
    return registry().model(kind)


def models() -> dict:
    """Every registered model by kind."""
    return registry().models


def algorithms() -> dict:
    """Every registered algorithm by name."""
    return registry().algorithms
