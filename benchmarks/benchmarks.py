"""asv benchmarks: seconds per sample (lower is better) of an EP training step, a BPTT training
step and a GDU computation, and peak memory, per model (Table 4 settings, batch 20) and backend.

Helpers are imported under a leading underscore: asv collects every module-level name that
starts with ``time_``/``track_``/``peakmem_`` as a benchmark.

Unavailable backends (e.g. the CUDA ones on a CPU machine) are skipped: ``setup`` raises
``NotImplementedError``, which asv reports as skipped.

GPUs: each timed region synchronises the device at both ends and the first (compiling) call is
left out (:func:`epbench.bench.best_time`); a GPU backend times ``GPU_BATCHES`` mini-batches
per region (a step of these models takes well under a millisecond on a GPU: a region of one
batch would be the size of the clock's and the launch queue's jitter); asv.conf.json sets
``launch_method`` to ``spawn``, since CUDA cannot be used in a forked child of a process that
has initialised it. docs/performance.md ("GPU") gives the regression commands.
"""

from epbench import bench as _bench

MODELS = ["p-1h", "eb-1h", "eb-2h", "p-3h", "p-conv"]
BACKENDS = ["torch-cpu", "jax-cpu", "numpy", "torch-cuda", "jax-cuda"]
BATCH = 20
#: mini-batches per timed region on a CPU (the larger models take seconds per batch there) and
#: on a GPU
CPU_BATCHES = {"p-conv": 1, "p-3h": 1, "eb-2h": 1}
GPU_BATCHES = 20


def _backend(name, model):
    from epbench.plugins import registry
    from epbench.presets import table4

    reg = registry()
    if name not in reg.backends:
        raise NotImplementedError(f"{name} is not registered")
    backend = reg.backends[name]
    avail = backend.availability(probe=True)
    if not avail.ok:
        raise NotImplementedError(avail.reason)
    spec, _, _ = table4(model)
    reason = backend.supports(spec, "float32")
    if reason:
        raise NotImplementedError(reason)
    return backend


class Step:
    """Seconds per sample of one mini-batch step."""

    params = (MODELS, BACKENDS)
    param_names = ["model", "backend"]
    timeout = 900
    number = 1
    repeat = 1

    def setup(self, model, backend):
        self.backend = _backend(backend, model)
        on_gpu = backend.endswith("-cuda")
        self.batches = GPU_BATCHES if on_gpu else CPU_BATCHES.get(model, 5)

    def _per_sample(self, model, algorithm):
        return _bench.time_per_batch(self.backend, model, algorithm, batches=self.batches, batch_size=BATCH,
                                      repeats=2).best_s / BATCH

    def track_ep_seconds_per_sample(self, model, backend):
        return self._per_sample(model, "ep")

    track_ep_seconds_per_sample.unit = "seconds"

    def track_bptt_seconds_per_sample(self, model, backend):
        return self._per_sample(model, "bptt")

    track_bptt_seconds_per_sample.unit = "seconds"

    def track_gdu_seconds_per_sample(self, model, backend):
        return self._per_sample(model, "gdu")

    track_gdu_seconds_per_sample.unit = "seconds"


class Memory:
    """Peak resident memory of one EP and one BPTT training step."""

    params = (MODELS, BACKENDS)
    param_names = ["model", "backend"]
    timeout = 900

    def setup(self, model, backend):
        self.backend = _backend(backend, model)

    def peakmem_ep_step(self, model, backend):
        _bench.time_per_batch(self.backend, model, "ep", batches=1, batch_size=BATCH, repeats=1)

    def peakmem_bptt_step(self, model, backend):
        _bench.time_per_batch(self.backend, model, "bptt", batches=1, batch_size=BATCH, repeats=1)
