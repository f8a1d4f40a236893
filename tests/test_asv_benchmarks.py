"""The asv suite is collected by name: every module-level function and class method whose name
starts with an asv prefix is run as a benchmark. Check that only intended benchmarks match, and
that each one is a method of a benchmark class with its parameters declared."""

import importlib.util
import inspect
from pathlib import Path

PREFIXES = ("time_", "timeraw_", "track_", "mem_", "peakmem_")
ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("asv_benchmarks", ROOT / "benchmarks" / "benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_stray_benchmarks_at_module_level():
    module = _load()
    stray = [n for n, _ in inspect.getmembers(module) if n.startswith(PREFIXES)]
    assert stray == [], f"asv would run these module-level names as benchmarks: {stray}"


def test_benchmark_methods_take_the_declared_parameters():
    module = _load()
    found = 0
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__:
            continue
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith(PREFIXES):
                found += 1
                args = list(inspect.signature(fn).parameters)[1:]
                assert args == list(cls.param_names), f"{cls.__name__}.{name}{tuple(args)}"
                assert len(cls.params) == len(cls.param_names)
    assert found >= 5
