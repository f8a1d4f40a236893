"""Backend-independent parameter initialisation, so that every backend (and EP and BPTT in one
trial) starts from bit-identical weights drawn from one seed."""

from __future__ import annotations

import numpy as np

from epbench.spec import ModelSpec


def fan_in_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense ``(out, in)`` or conv ``(C_out, C_in, F, F)`` weight."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def init_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Initial parameters (float64) for ``spec``.

    * ``paper``: Glorot-uniform weights, U(±sqrt(6 / (fan_in + fan_out))) [APP E], no biases.
    * ``official-code``: PyTorch's default for ``nn.Linear``/``nn.Conv2d``,
      U(±1/sqrt(fan_in)) for weights and for the bias of the layer they drive (docs/equations.md, departures of the official-code flavour).
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    driving_fan_in: dict[int, int] = {}
    for name, shape in spec.param_shapes.items():
        if name.startswith("b"):
            continue
        fan_in, fan_out = fan_in_out(shape)
        driving_fan_in.setdefault(spec.param_layer(name), fan_in)
        if spec.flavor == "paper":
            bound = np.sqrt(6.0 / (fan_in + fan_out))
        else:
            bound = 1.0 / np.sqrt(fan_in)
        params[name] = rng.uniform(-bound, bound, size=shape)
    for name, shape in spec.param_shapes.items():
        if name.startswith("b"):
            bound = 1.0 / np.sqrt(driving_fan_in[spec.param_layer(name)])
            params[name] = rng.uniform(-bound, bound, size=shape)
    return params


def check_params(spec: ModelSpec, params: dict[str, np.ndarray]) -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the canonical names and shapes."""
    expected = spec.param_shapes
    if set(params) != set(expected):
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        raise ValueError(f"parameter names differ: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(np.shape(params[name])) != tuple(shape):
            raise ValueError(f"parameter {name} has shape {np.shape(params[name])}, expected {shape}")
