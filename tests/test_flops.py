"""Analytic FLOP counts against hand-computed values."""

from epbench import flops
from epbench.spec import ModelSpec, PhaseSettings


def test_fully_connected_counts():
    spec = ModelSpec(kind="p", n_in=6, hidden=(4,), n_out=3, flavor="paper")
    phase = PhaseSettings(T=5, K=2, beta=0.1)
    # per sample: drive 2*4*6 = 48; one step: W01 and W01ᵀ = 2 * (2*3*4) = 48;
    # ∂Φ/∂θ: W01 (24) + W1x (48) = 72; the update takes W01's at two states, W1x's once (Δs uᵀ)
    assert flops.ep_train_flops(spec, phase, 2) == 2 * (48 + (5 + 2) * 48 + 2 * 24 + 48)
    # BPTT over K = 2 steps (paper flavour): per step 48 + 24, plus one input-side product 48
    assert flops.bptt_train_flops(spec, phase, 2) == 2 * (48 + 5 * 48 + 2 * (48 + 24) + 48)
    assert flops.gdu_flops(spec, phase, 1) == 48 + 5 * 48 + 3 * (48 + 72) + 2 * (48 + 72)


def test_symmetric_nudging_doubles_the_nudged_phase():
    spec = ModelSpec(kind="eb", n_in=6, hidden=(4,), n_out=3)
    one = PhaseSettings(T=5, K=2, beta=0.1)
    sym = PhaseSettings(T=5, K=2, beta=0.1, symmetric=True)
    assert flops.ep_train_flops(spec, sym, 1) - flops.ep_train_flops(spec, one, 1) == 2 * 48


def test_official_code_bptt_spans_k_plus_one():
    paper = ModelSpec(kind="eb", n_in=6, hidden=(4,), n_out=3, flavor="paper")
    code = ModelSpec(kind="eb", n_in=6, hidden=(4,), n_out=3, flavor="official-code")
    phase = PhaseSettings(T=5, K=2, beta=0.1)
    assert flops.bptt_train_flops(code, phase, 1) - flops.bptt_train_flops(paper, phase, 1) == 48 + 24


def test_pconv_counts():
    spec = ModelSpec(kind="pconv", activation="hard_sigmoid")
    phase = PhaseSettings(T=1, K=1, beta=0.1)
    conv1 = 2 * 32 * 25 * 24 * 24
    conv2 = 2 * 64 * 32 * 25 * 8 * 8
    fc = 2 * 10 * 1024
    step = 2 * conv2 + 2 * fc
    assert flops.ep_train_flops(spec, phase, 1) == conv1 + 2 * step + 2 * (conv2 + fc) + conv1


def test_alternation_halves_the_step_products():
    spec = ModelSpec(kind="p", n_in=6, hidden=(4,), n_out=3, flavor="paper")
    sync = PhaseSettings(T=6, K=2, beta=0.1)
    alt = PhaseSettings(T=6, K=2, beta=0.1, alternate=True)
    # per sample: one step = 48 (see above); 8 steps of EP, 6 + 2 of BPTT (2 with 48 + 24)
    assert flops.ep_train_flops(spec, sync, 1) - flops.ep_train_flops(spec, alt, 1) == 4 * 48
    assert flops.bptt_train_flops(spec, sync, 1) - flops.bptt_train_flops(spec, alt, 1) == 3 * 48 + (48 + 24)
