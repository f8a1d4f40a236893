"""torch-cuda's paths, tested where they do not need a GPU.

* Capturable programs: every program the core runs (first phase, each algorithm's gradient,
  GDU, training chunks, evaluation, F and Φ) is run on PyTorch's meta device with the CUDA
  settings of :class:`TorchOps` (``device_side=True``): reading a value on the host raises
  there, as a synchronisation would break a CUDA-graph capture, and any tensor an operation
  puts on the CPU or makes from host data is recorded (a host copy inside a capture).
* The device-side ``cond`` trains bit for bit like the host one, divergence included.
* Trials batched with ``torch.func.vmap`` (``EPBENCH_BATCH_TRIALS=1``) train each trial as alone.
* :class:`GraphRunner` with a replay that recomputes the outputs in place from the static
  arguments (what a CUDA graph's replay does): copy-in, copy-out, the cache per argument
  shapes, the choice by measurement, a failed capture, the environment variable.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SMALL_MODELS, assert_batched_trials_train_as_alone
from epbench import compute, training
from epbench.errors import EpbenchError
from epbench.ops import tree_map
from epbench.spec import ModelSpec, PhaseSettings, TrainSettings
from epbench_torch.backend import TorchBackend
from epbench_torch.graphs import GraphRunner, mode_from_env
from epbench_torch.ops import TorchOps


class _CpuTensors(TorchDispatchMode):
    """Records every operation that returns a CPU tensor or copies one to the device (a Python
    scalar made into a device tensor is such a copy: on CUDA, a host-to-device transfer that a
    graph capture refuses)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        on_cpu = [isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves(out)]
        from_cpu = [isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in leaves((args, kwargs))]
        if any(on_cpu) or (any(from_cpu) and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)):
            self.ops.add(str(func))
        return out


class _HostData(TorchFunctionMode):
    """Records tensors made from host data (``torch.tensor(3.0)``, ``torch.asarray(False)``):
    on CUDA each is a host-to-device copy, which a graph capture refuses (the dispatch mode
    above does not see them)."""

    def __init__(self):
        super().__init__()
        self.calls: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.asarray, torch.as_tensor) and args and not isinstance(args[0], torch.Tensor):
            self.calls.add(f"torch.{func.__name__}({args[0]!r})")
        return func(*args, **(kwargs or {}))


class MetaCheckedBackend(TorchBackend):
    """torch-cpu that also runs every program on meta copies of its arguments with the CUDA
    ``TorchOps``, and keeps what went wrong there."""

    def __init__(self, device_side: bool = True):
        super().__init__("cpu")
        self._ops = TorchOps(device_side=device_side)
        self.checked: list[str] = []
        self.problems: list[str] = []

    def run(self, key, build, *args):
        meta = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, args)
        cpu, host = _CpuTensors(), _HostData()
        try:
            with torch.no_grad(), cpu, host:
                build()(*meta)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            self.problems.append(f"{key[0]}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        if cpu.ops:
            self.problems.append(f"{key[0]}: tensors made on the CPU by {sorted(cpu.ops)}")
        if host.calls:
            self.problems.append(f"{key[0]}: tensors made from host data by {sorted(host.calls)}")
        self.checked.append(key[0])
        return super().run(key, build, *args)


def _data(spec, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, int(np.prod(spec.input_shape))))
    labels = rng.integers(0, spec.n_out, n)
    return x, labels, np.eye(spec.n_out)[labels]


MODELS = {**{k: ModelSpec(**v) for k, v in SMALL_MODELS.items()},
          "eb-lateral": dict(kind="eb-lateral", hidden=(6, 5), n_in=8, n_out=4, activation="tanh", dt=0.5)}


def _spec(name: str) -> ModelSpec:
    spec = MODELS[name]
    if isinstance(spec, dict):
        from epbench.plugins import registry

        if spec["kind"] not in registry().models:
            pytest.skip(f"model {spec['kind']} is not installed")
        spec = ModelSpec(**spec)
    return spec


@pytest.mark.parametrize("name", list(MODELS))
def test_every_program_of_the_core_runs_on_the_meta_device(name):
    """No host read and no CPU tensor in any program: what a CUDA-graph capture needs."""
    from epbench.plugins import registry

    spec = _spec(name)
    b = MetaCheckedBackend()
    params = b.from_numpy(spec, b.init_params(spec, 0), "float32")
    x, labels, y = _data(spec, 6)
    phase = PhaseSettings(T=6, K=4, beta=0.1, dtype="float32")
    compute.first_phase(b, spec, params, x, 5)
    compute.step_function(b, spec, params, x, compute.first_phase(b, spec, params, x, 3))
    compute.phi(b, spec, params, x, compute.first_phase(b, spec, params, x, 3))
    algorithms = sorted(registry().algorithms)
    for alg in algorithms:
        compute.gradient(b, spec, params, x, y, phase, alg)
    compute.gdu(b, spec, params, x, y, phase, ("ep",))
    compute.gdu(b, spec, params, x, y, phase.model_copy(update={"symmetric": True}), ("ep",))
    train = TrainSettings(lrs=(0.01,) * len(spec.state_shapes), batch_size=4)  # chunks of 4 and 2 samples
    for alg in ("ep", "bptt"):
        training.train_epochs(b, spec, [params], [x], [labels], phase, train, alg)
    training.evaluate(b, spec, params, x, labels, 5, batch_size=4)
    assert b.problems == []
    assert {"first_phase", "step", "phi", "gradient", "gdu", "train", "evaluate"} <= set(b.checked)
    assert b.checked.count("gradient") == len(algorithms)


def test_the_meta_check_catches_a_host_read():
    """The check above can fail: the CPU ``cond`` reads its predicate, which meta tensors refuse."""
    spec = ModelSpec(**SMALL_MODELS["eb"])
    b = MetaCheckedBackend(device_side=False)
    params = b.from_numpy(spec, b.init_params(spec, 0), "float32")
    x, labels, _ = _data(spec, 4)
    training.train_epochs(b, spec, [params], [x], [labels], PhaseSettings(T=4, K=2, beta=0.1),
                          TrainSettings(lrs=(0.01,) * 3, batch_size=2), "ep")
    assert any(p.startswith("train:") and "item()" in p for p in b.problems), b.problems


@pytest.mark.parametrize("lr", [0.05, float("inf")])
def test_device_side_cond_trains_bit_for_bit_like_the_host_cond(lr):
    """The same parameters, errors and divergence flags, with a diverging rate too (an infinite
    rate on the output layer: the second batch diverges, the eight after it are skipped)."""
    spec = ModelSpec(**SMALL_MODELS["p"])
    x, labels, _ = _data(spec, 40)
    phase = PhaseSettings(T=8, K=3, beta=0.5)
    train = TrainSettings(lrs=(lr, 0.05, 0.05), batch_size=4)
    results = []
    for device_side in (False, True):
        b = TorchBackend("cpu")
        b._ops = TorchOps(device_side=device_side)
        params = b.from_numpy(spec, b.init_params(spec, 0), "float32")
        results.append(training.train_epochs(b, spec, [params], [x], [labels], phase, train, "ep")[0])
    host, device = results
    assert host.diverged == device.diverged == (lr > 1)
    assert host.train_error == device.train_error
    for k in host.params:
        torch.testing.assert_close(device.params[k], host.params[k], rtol=0, atol=0, equal_nan=True)


class RerunGraphs:
    """A capture whose replay recomputes the outputs in place from the static arguments, as a
    CUDA graph's replay does (on the CPU, by running the program again)."""

    fail = False

    @staticmethod
    def warm_up(program, args):
        return program(*args)

    def capture(self, program, args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = program(*args)

        def replay():
            tree_map(lambda dst, src: dst.copy_(src), out, program(*args))

        return out, replay


def _graph_backend(mode: str, graphs=None, cache_size: int = 16) -> TorchBackend:
    b = TorchBackend("cpu")
    b._ops = TorchOps(device_side=True)
    b.runner = GraphRunner(mode, graphs=graphs or RerunGraphs(), cache_size=cache_size)
    return b


def test_replayed_programs_equal_eager_ones_and_own_their_outputs():
    spec = ModelSpec(**SMALL_MODELS["eb"])
    phase = PhaseSettings(T=10, K=4, beta=0.2, dtype="float64")
    eager, graph = TorchBackend("cpu"), _graph_backend("graph")
    p_e = eager.from_numpy(spec, eager.init_params(spec, 0), "float64")
    p_g = graph.from_numpy(spec, graph.init_params(spec, 0), "float64")
    x1, lab1, y1 = _data(spec, 5, seed=1)
    x2, lab2, y2 = _data(spec, 5, seed=2)
    first = compute.gradient(graph, spec, p_g, x1, y1, phase, "ep")
    kept = {k: v.copy() for k, v in first.items()}
    second = compute.gradient(graph, spec, p_g, x2, y2, phase, "ep")  # replayed on new arguments
    assert graph.pop_implementation() == "cuda-graph"
    for got, (x, y) in ((first, (x1, y1)), (second, (x2, y2))):
        want = compute.gradient(eager, spec, p_e, x, y, phase, "ep")
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for k in kept:  # the second call did not write into the first call's results
        np.testing.assert_array_equal(first[k], kept[k])
    assert not np.allclose(first["W01"], second["W01"])

    # training chunks: parameters, error and divergence flag as eager, chunk after chunk
    train = TrainSettings(lrs=(0.05, 0.1, 0.2), batch_size=2)
    x, labels, _ = _data(spec, 9)
    want = training.train_epochs(eager, spec, [p_e], [x], [labels], phase, train, "bptt")[0]
    got = training.train_epochs(graph, spec, [p_g], [x], [labels], phase, train, "bptt")[0]
    assert got.train_error == want.train_error and got.diverged == want.diverged
    for k in want.params:
        torch.testing.assert_close(got.params[k], want.params[k], rtol=0, atol=0)


def test_a_capture_is_kept_per_argument_shapes_and_the_oldest_dropped():
    spec = ModelSpec(**SMALL_MODELS["toy"])
    b = _graph_backend("graph", cache_size=2)
    params = b.from_numpy(spec, b.init_params(spec, 0), "float32")
    for n in (3, 3, 4, 5):
        compute.first_phase(b, spec, params, _data(spec, n)[0], 5)
    batches = [sig[1][1][-1][0][0] for sig in b.runner.cache]  # x's batch size, the last argument
    assert batches == [4, 5]


def test_measure_mode_runs_a_first_call_eagerly_then_keeps_the_faster():
    """A program called once is never captured; on its second call both ways are timed and the
    faster serves every later call."""
    from epbench_torch.graphs import Captured

    spec = ModelSpec(**SMALL_MODELS["toy"])
    b = _graph_backend("measure")
    params = b.from_numpy(spec, b.init_params(spec, 0), "float64")
    x = _data(spec, 4)[0]
    first = compute.first_phase(b, spec, params, x, 7)
    assert not b.runner.cache and len(b.runner.seen) == 1 and b.pop_implementation() == "eager"
    second = compute.first_phase(b, spec, params, x, 7)
    (entry,) = b.runner.cache.values()
    assert entry is None or isinstance(entry, Captured)
    label = b.pop_implementation()
    assert label == ("eager" if entry is None else "cuda-graph")
    third = compute.first_phase(b, spec, params, x, 7)
    assert b.pop_implementation() == label
    for a, c, d in zip(first, second, third):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(a, d)


def test_a_failed_capture_runs_eagerly_or_fails_in_one_line_when_forced():
    spec = ModelSpec(**SMALL_MODELS["toy"])
    broken = RerunGraphs()
    broken.fail = True
    b = _graph_backend("measure", graphs=broken)
    params = b.from_numpy(spec, b.init_params(spec, 0), "float64")
    x = _data(spec, 4)[0]
    compute.first_phase(b, spec, params, x, 6)  # a first call runs eagerly, capturing nothing
    with pytest.warns(RuntimeWarning, match="capture of the first_phase program failed"):
        got = compute.first_phase(b, spec, params, x, 6)
    assert b.pop_implementation() == "eager"
    want = compute.first_phase(TorchBackend("cpu"), spec, params, x, 6)
    for a, c in zip(got, want):
        np.testing.assert_array_equal(a, c)
    forced = _graph_backend("graph", graphs=broken)
    with pytest.raises(EpbenchError, match="^CUDA graph capture of the first_phase program failed: RuntimeError"):
        compute.first_phase(forced, spec, params, x, 6)


def test_the_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("EPBENCH_TORCH_GRAPHS", raising=False)
    assert mode_from_env("cuda") == "measure" and mode_from_env("cpu") == "eager"
    monkeypatch.setenv("EPBENCH_TORCH_GRAPHS", "0")
    assert mode_from_env("cuda") == "eager"
    monkeypatch.setenv("EPBENCH_TORCH_GRAPHS", "1")
    assert mode_from_env("cuda") == "graph"
    with pytest.raises(EpbenchError, match="need torch-cuda"):
        mode_from_env("cpu")
    monkeypatch.setenv("EPBENCH_TORCH_GRAPHS", "yes")
    with pytest.raises(EpbenchError, match="use 0 .eager., 1"):
        mode_from_env("cuda")


def test_a_bad_graph_setting_stops_a_run_before_its_first_cell(tmp_path, monkeypatch, capsys):
    """The runner asks the backend for its implementation before the first experiment, which
    reads EPBENCH_TORCH_GRAPHS (once per process, when the backend first needs its graph runner):
    one line, exit status 2, no rows."""
    from epbench.cli import main
    from epbench.plugins import registry

    monkeypatch.setattr(registry().backends["torch-cpu"], "runner", None)  # as in a new process
    monkeypatch.setenv("EPBENCH_TORCH_GRAPHS", "yes")
    capsys.readouterr()
    assert main(["-q", "run", "table3", "--quick", "--only", "toy", "-b", "torch-cpu", "--out", str(tmp_path),
                 "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: EPBENCH_TORCH_GRAPHS='yes': use 0 (eager), 1")
    (table,) = tmp_path.glob("*/results.parquet")
    assert len(pd.read_parquet(table)) == 0


def test_torch_cuda_uses_device_side_ops_and_says_it_captures_per_shape():
    cuda, cpu = TorchBackend("cuda"), TorchBackend("cpu")
    assert cuda.ops.device_side and not cpu.ops.device_side
    assert cuda.capabilities.compiles and not cpu.capabilities.compiles  # the runner's "first run of this shape" line


@pytest.mark.parametrize("kind", ["p", "pconv"])
def test_batched_trials_equal_one_after_the_other(kind, monkeypatch):
    """EPBENCH_BATCH_TRIALS=1: one vmapped program (functional ops) gives each trial what it gets
    trained alone; a trial that diverges stops alone."""
    monkeypatch.setenv("EPBENCH_BATCH_TRIALS", "1")
    batched = TorchBackend("cpu")
    assert batched.batch_trials and batched.ops.functional
    monkeypatch.delenv("EPBENCH_BATCH_TRIALS")
    alone = TorchBackend("cpu")
    assert not alone.batch_trials
    with warnings.catch_warnings():  # max_unpool2d has no batching rule: vmap loops over it
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        assert_batched_trials_train_as_alone(batched, alone, ModelSpec(**SMALL_MODELS[kind]), atol=1e-12)
