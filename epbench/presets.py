"""The rows of Tables 3 and 4 of the appendix (sections C and E) as ready-made specs and settings."""

from __future__ import annotations

from epbench.spec import ModelSpec, PhaseSettings, TrainSettings

H = 512

#: Table 3, GDU demonstrations [APP C]: (model kwargs, T, K, β)
TABLE3: dict[str, tuple[dict, int, int, float]] = {
    "toy": (dict(kind="toy", n_in=10, hidden=(50,), n_out=5, activation="tanh", dt=0.08), 5000, 80, 0.01),
    "eb-1h": (dict(kind="eb", hidden=(H,), activation="tanh", dt=0.08), 800, 80, 0.001),
    "eb-2h": (dict(kind="eb", hidden=(H, H), activation="tanh", dt=0.08), 5000, 150, 0.01),
    "eb-3h": (dict(kind="eb", hidden=(H, H, H), activation="tanh", dt=0.08), 30000, 200, 0.02),
    "p-1h": (dict(kind="p", hidden=(H,), activation="tanh", dt=1.0), 150, 10, 0.01),
    "p-2h": (dict(kind="p", hidden=(H, H), activation="tanh", dt=1.0), 1500, 40, 0.01),
    "p-3h": (dict(kind="p", hidden=(H, H, H), activation="tanh", dt=1.0), 5000, 40, 0.015),
    "p-conv": (dict(kind="pconv", activation="hard_sigmoid"), 5000, 10, 0.02),
}

#: Table 4, MNIST training [APP E]: (model kwargs, T, K, β, epochs, learning rates input side first)
TABLE4: dict[str, tuple[dict, int, int, float, int, tuple[float, ...]]] = {
    "eb-1h": (dict(kind="eb", hidden=(H,), activation="sigmoid", dt=0.2, clamp=True), 100, 12, 0.5, 30, (0.1, 0.05)),
    "eb-2h": (dict(kind="eb", hidden=(H, H), activation="sigmoid", dt=0.2, clamp=True), 500, 40, 0.8, 50,
              (0.4, 0.1, 0.01)),
    "p-1h": (dict(kind="p", hidden=(H,), activation="sigmoid", dt=1.0), 30, 10, 0.1, 30, (0.08, 0.04)),
    "p-2h": (dict(kind="p", hidden=(H, H), activation="sigmoid", dt=1.0), 100, 20, 0.5, 50, (0.2, 0.05, 0.005)),
    "p-3h": (dict(kind="p", hidden=(H, H, H), activation="sigmoid", dt=1.0), 180, 20, 0.5, 100,
             (0.2, 0.05, 0.01, 0.002)),
    "p-conv": (dict(kind="pconv", activation="hard_sigmoid"), 200, 10, 0.4, 40, (0.15, 0.035, 0.015)),
}


def table3(row: str, flavor: str = "paper", dtype: str = "float32") -> tuple[ModelSpec, PhaseSettings]:
    kw, T, K, beta = TABLE3[row]
    return ModelSpec(**kw, flavor=flavor), PhaseSettings(T=T, K=K, beta=beta, dtype=dtype)


def table4(row: str, flavor: str = "paper", dtype: str = "float32") -> tuple[ModelSpec, PhaseSettings, TrainSettings]:
    kw, T, K, beta, epochs, lrs = TABLE4[row]
    return (ModelSpec(**kw, flavor=flavor), PhaseSettings(T=T, K=K, beta=beta, dtype=dtype),
            TrainSettings(lrs=lrs, epochs=epochs))
