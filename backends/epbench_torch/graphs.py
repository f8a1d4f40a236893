"""How torch-cuda runs a program: eagerly, or captured once as a CUDA graph and replayed.

A program of the core (a first phase, a gradient, a GDU computation, a training chunk of up to
100 mini-batches) is thousands of small kernels; run eagerly, each is one Python dispatch and
one launch, and on a GPU the launches, not the arithmetic, set the time. A CUDA graph records
the program's kernels once and replays them all with one call.

A captured program reads its arguments from static buffers (each call copies its arguments into
them: β, the learning rates and the parameters are arguments, so a new value never needs a new
capture) and writes its outputs into static buffers (each call returns copies of them). Capture
requires a program that never reads a device value on the host and creates no tensor on the
CPU: :class:`~epbench_torch.ops.TorchOps` with ``device_side=True`` keeps the core's programs
so, and tests/test_torch_graphs.py runs every one of them on PyTorch's meta device, where either
mistake raises.

Whether the graph pays is measured, not assumed: ``EPBENCH_TORCH_GRAPHS`` unset, the first call
of each (program, argument shapes) runs eagerly, and so does nothing more (a program called once,
such as a long Table 3 first phase, is never worth a capture); the second call runs eagerly
(also the capture's warm-up), is captured, then replayed, and the faster of the two is kept for
every later call. ``=1`` captures on the first call and always replays, ``=0`` runs eagerly (a
per-step loop, the official code's way). The implementation that ran is reported as
``cuda-graph`` or ``eager``.
"""

from __future__ import annotations

import collections
import os
import time
import warnings
from typing import Callable

from epbench.errors import EpbenchError
from epbench.ops import tree_leaves, tree_map

#: ``EPBENCH_TORCH_GRAPHS`` value → mode
MODES = {"": "measure", "0": "eager", "1": "graph"}
#: captured programs kept (least recently used dropped first: each holds its own memory pool)
CACHE_SIZE = 16
_MISSING = object()


def mode_from_env(device_kind: str) -> str:
    """``measure``, ``graph`` or ``eager`` from ``EPBENCH_TORCH_GRAPHS``; always ``eager`` on the CPU.
    Read once per backend, when it first needs its :class:`GraphRunner`."""
    value = os.environ.get("EPBENCH_TORCH_GRAPHS", "").strip()
    if value not in MODES:
        raise EpbenchError(f"EPBENCH_TORCH_GRAPHS={value!r}: use 0 (eager), 1 (CUDA graphs) or leave it "
                           "unset (chosen by measurement)")
    if device_kind != "cuda":
        if MODES[value] == "graph":
            raise EpbenchError("EPBENCH_TORCH_GRAPHS=1: CUDA graphs need torch-cuda (torch-cpu runs eagerly)")
        return "eager"
    return MODES[value]


def signature(args) -> tuple:
    """What a captured program depends on besides values: the arguments' tree structure and each
    tensor's shape, dtype and device (anything else by value)."""
    import torch

    def leaf(a):
        return (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a

    return repr(tree_map(lambda _: 0, args)), tuple(leaf(a) for a in tree_leaves(args))


class CudaGraphs:
    """Warm-up and capture on the current CUDA device (``torch.cuda.graph``)."""

    @staticmethod
    def warm_up(program: Callable, args):
        """One eager run on a side stream (lazy initialisations happen outside the capture)."""
        import torch

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = program(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    @staticmethod
    def capture(program: Callable, args):
        """``(static outputs, replay)``: the program recorded as one CUDA graph on ``args``."""
        import torch

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = program(*args)
        return out, graph.replay


class Captured:
    """A program bound to static argument and output buffers and a ``replay`` that recomputes
    the outputs in place from the arguments."""

    def __init__(self, static_args, static_out, replay: Callable[[], None]):
        self.static_args = static_args
        self.static_out = static_out
        self.replay = replay

    def __call__(self, args):
        for dst, src in zip(tree_leaves(self.static_args), tree_leaves(args)):
            dst.copy_(src)
        self.replay()
        return tree_map(lambda t: t.clone(), self.static_out)


class GraphRunner:
    """Runs the programs of one backend (:meth:`TorchBackend.run`) in ``mode``: ``eager``,
    ``graph`` (captured on first use, then replayed) or ``measure`` (eager on first use; both
    timed on the second, the faster kept). ``graphs`` does the warm-up and capture (:class:`CudaGraphs`);
    ``synchronize`` waits for the device, so that every timing covers the device's work."""

    def __init__(self, mode: str, graphs=CudaGraphs, synchronize: Callable[[], None] = lambda: None,
                 cache_size: int = CACHE_SIZE):
        if mode not in MODES.values():
            raise ValueError(f"mode must be one of {sorted(MODES.values())}, not {mode!r}")
        self.mode = mode
        self.graphs = graphs
        self.synchronize = synchronize
        self.cache_size = cache_size
        #: (key, signature) → Captured, or None where eager was measured faster (or capture failed)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        #: (key, signature) of the programs run once so far (``measure``: raced on their second call);
        #: kept apart so that one-off programs never evict a capture
        self.seen: set = set()
        #: implementations used since the last ``pop_used()``
        self.used: set[str] = set()
        self._warned = False

    def pop_used(self) -> str:
        used, self.used = self.used, set()
        return "+".join(sorted(used)) or "eager"

    def _timed(self, f: Callable[[], object]) -> tuple[object, float]:
        t0 = time.perf_counter()
        out = f()
        self.synchronize()
        return out, time.perf_counter() - t0

    def run(self, key: tuple, build: Callable[[], Callable], args: tuple):
        """``(outputs, {"compile_s", "run_s"})`` of ``build()(*args)``: ``compile_s`` is the
        warm-up and capture of the capturing call (and the slower candidate's timed run),
        ``run_s`` the run."""
        if self.mode == "eager":
            return self._eager(build, args)
        sig = (key, signature(args))
        entry = self.cache.get(sig, _MISSING)
        if entry is not _MISSING:
            self.cache.move_to_end(sig)
        if isinstance(entry, Captured):
            out, run_s = self._timed(lambda: entry(args))
            self.used.add("cuda-graph")
            return out, {"compile_s": 0.0, "run_s": run_s}
        if entry is None:  # eager was measured faster
            return self._eager(build, args)
        if self.mode == "measure" and sig not in self.seen:  # a first call: eager, and nothing more
            self.seen.add(sig)
            return self._eager(build, args)
        return self._capturing_call(sig, key, build(), args)

    def _eager(self, build, args):
        out, run_s = self._timed(lambda: build()(*args))
        self.used.add("eager")
        return out, {"compile_s": 0.0, "run_s": run_s}

    def _capturing_call(self, sig, key, program, args):
        static = tree_map(lambda t: t.clone(), args)
        out, eager_s = self._timed(lambda: self.graphs.warm_up(program, static))
        t0 = time.perf_counter()
        try:
            static_out, replay = self.graphs.capture(program, static)
        except Exception as exc:  # noqa: BLE001 - a program that cannot be captured runs eagerly
            if self.mode == "graph":
                raise EpbenchError(f"CUDA graph capture of the {key[0]} program failed: "
                                   f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            if not self._warned:
                warnings.warn(f"CUDA graph capture of the {key[0]} program failed ({type(exc).__name__}: {exc}); "
                              "running it eagerly", RuntimeWarning, stacklevel=3)
                self._warned = True
            self._store(sig, None)
            self.used.add("eager")
            return out, {"compile_s": time.perf_counter() - t0, "run_s": eager_s}
        captured = Captured(static, static_out, replay)
        capture_s = time.perf_counter() - t0
        replayed, graph_s = self._timed(lambda: captured(args))
        keep = self.mode == "graph" or graph_s < eager_s
        self._store(sig, captured if keep else None)
        self.used.add("cuda-graph" if keep else "eager")
        if keep:
            return replayed, {"compile_s": eager_s + capture_s, "run_s": graph_s}
        return out, {"compile_s": capture_s + graph_s, "run_s": eager_s}

    def _store(self, sig, entry) -> None:
        self.cache[sig] = entry
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
