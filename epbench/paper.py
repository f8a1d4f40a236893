"""Published reference values of Ernoult et al. (NeurIPS 2019), as data.

Everything here is *published* (or measured once with the official code's classes: see
docs/equations.md, "Reference magnitudes of the official code"), never a result of this harness. Rows are keyed by the preset names of :mod:`epbench.presets`
(``toy``, ``eb-1h``, ``eb-2h``, ``eb-3h``, ``p-1h``, ``p-2h``, ``p-3h``, ``p-conv``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: preset row names, in the paper's order
PRESET_KEYS = ("toy", "eb-1h", "eb-2h", "eb-3h", "p-1h", "p-2h", "p-3h", "p-conv")

#: how each preset row is written in the paper
DISPLAY = {"toy": "Toy", "eb-1h": "EB-1h", "eb-2h": "EB-2h", "eb-3h": "EB-3h", "p-1h": "P-1h",
           "p-2h": "P-2h", "p-3h": "P-3h", "p-conv": "P-conv"}


@dataclass(frozen=True)
class PublishedTraining:
    """One row of Table 1 (MNIST, mean ± std over 5 trials; train error is a mean), in %."""

    ep_test: float
    ep_test_std: float
    ep_train: float
    bptt_test: float
    bptt_test_std: float
    bptt_train: float
    T: int
    K: int
    epochs: int
    trials: int = 5


#: Table 1 of the paper (main text), published values
TABLE1: dict[str, PublishedTraining] = {
    "eb-1h": PublishedTraining(2.06, 0.17, 0.13, 2.11, 0.09, 0.46, T=100, K=12, epochs=30),
    "eb-2h": PublishedTraining(2.01, 0.21, 0.11, 2.02, 0.15, 0.29, T=500, K=40, epochs=50),
    "p-1h": PublishedTraining(2.00, 0.13, 0.20, 2.00, 0.12, 0.55, T=30, K=10, epochs=30),
    "p-2h": PublishedTraining(1.95, 0.10, 0.14, 2.09, 0.12, 0.37, T=100, K=20, epochs=50),
    "p-3h": PublishedTraining(2.01, 0.18, 0.10, 2.30, 0.17, 0.52, T=180, K=20, epochs=100),
    "p-conv": PublishedTraining(1.02, 0.04, 0.54, 0.88, 0.06, 0.12, T=200, K=10, epochs=40),
}


@dataclass(frozen=True)
class SanityMagnitudes:
    """Official-code GDU magnitudes at Table 3 settings (docs/equations.md): expected orders, not bounds.

    ``neurons``: RelMSE of s0, s1, ...; ``weights``: one (low, high) range per weight layer,
    output side first, or a single range for every weight layer; ``same_sign``: % range.
    """

    batch_size: int
    neurons: tuple[float, ...]
    weights: tuple[tuple[float, float], ...]
    same_sign: tuple[float, float]

    def neuron_value(self, index: int) -> float | None:
        return self.neurons[index] if 0 <= index < len(self.neurons) else None

    def weight_range(self, index: int) -> tuple[float, float] | None:
        """Range for the ``index``-th weight layer (output side first)."""
        if len(self.weights) == 1:
            return self.weights[0]
        return self.weights[index] if 0 <= index < len(self.weights) else None


#: measured with the official code's classes (docs/equations.md) (untrained weights, P with dt = 1)
SANITY: dict[str, SanityMagnitudes] = {
    "toy": SanityMagnitudes(1, (0.006, 0.005), ((0.009, 0.009), (0.006, 0.006), (0.004, 0.004)), (100.0, 100.0)),
    "eb-1h": SanityMagnitudes(20, (0.003, 0.049), ((0.043, 0.043), (0.049, 0.049)), (99.5, 99.5)),
    "p-1h": SanityMagnitudes(20, (0.012, 0.09), ((0.06, 0.10),), (99.0, 99.0)),
    "p-2h": SanityMagnitudes(20, (0.02, 0.23, 0.24), ((0.29, 0.32),), (95.0, 97.0)),
    "p-conv": SanityMagnitudes(1, (0.48, 0.91, 0.88), ((0.14, 0.14), (0.74, 0.74), (0.78, 0.78)), (72.0, 92.0)),
}

#: tolerance of the "in range" check against :data:`SANITY` (docs/equations.md: "within a factor of about 2-3")
SANITY_FACTOR = 3.0


def within_factor(value: float, low: float, high: float, factor: float = SANITY_FACTOR) -> bool:
    """True when ``low / factor <= value <= high * factor``."""
    return low / factor <= value <= high * factor


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", str(name).strip().lower())


def _from_model(model: str, model_desc: str) -> str | None:
    kind = (model or (model_desc.split()[0] if model_desc else "")).strip().lower()
    if kind == "toy":
        return "toy"
    if kind == "pconv":
        return "p-conv"
    if kind in ("eb", "p") and model_desc:
        parts = model_desc.split()
        if len(parts) > 1 and re.fullmatch(r"\d+(-\d+)+", parts[1]):
            hidden = len(parts[1].split("-")) - 2
            key = f"{kind}-{hidden}h"
            return key if key in PRESET_KEYS else None
    return None


def preset_key(row: Mapping | str, model: str = "", model_desc: str = "") -> str | None:
    """The preset row of an experiment: by name prefix (``eb-1h-official`` → ``eb-1h``), else by
    model kind and number of hidden layers (from ``model``/``model_desc``); None if neither fits.

    ``row`` is a table row (mapping with ``experiment``, ``model``, ``model_desc``) or a name.
    """
    if isinstance(row, Mapping):
        name = str(row.get("experiment", ""))
        model = str(row.get("model", model) or "")
        model_desc = str(row.get("model_desc", model_desc) or "")
    else:
        name = str(row)
    norm = _norm(name)
    norm = re.sub(r"^(eb|p)-?(\d+)-?h(?=$|[-.])", r"\1-\2h", norm)
    norm = re.sub(r"^p-?conv(?=$|[-.])", "p-conv", norm)
    for key in sorted(PRESET_KEYS, key=len, reverse=True):
        if norm == key or norm.startswith(key + "-") or norm.startswith(key + "."):
            return key
    return _from_model(model, model_desc)
