"""EB-1h (Table 4 settings, states clamped to [0, 1]): share of held-out images whose correct-class
output sits on the clamp's lower bound 0 (where BPTT's gradient cannot reach it), and the test
error on them, after 0, 10, 50 and 200 SGD steps of BPTT or EP from the same initial weights,
in each flavour. mnist-5k, jax-cpu, seed 0, the runner's data order for trial 1's first epoch,
the first 500 test images.

Usage: python results/eb1h-targets-on-the-bound.py
"""
import numpy as np

from epbench import compute, presets, training
from epbench.datasets import epoch_order, load_dataset
from epbench.plugins import registry

be = registry().backend("jax-cpu")
split = load_dataset("mnist-5k")
order = epoch_order(len(split.x_train), 1)
X, L = split.x_train[order], split.y_train[order]
xt, yt = split.x_test[:500], split.y_test[:500]
for flavor in ("paper", "official-code"):
    spec, phase, train = presets.table4("eb-1h", flavor=flavor)
    p0 = be.init_params(spec, 0)
    for alg in ("bptt", "ep"):
        P = be.from_numpy(spec, p0, phase.dtype)
        done, out = 0, []
        for n in (0, 10, 50, 200):
            if n:
                part = slice(done * 20, n * 20)
                P = training.train_epochs(be, spec, [P], [X[part]], [L[part]], phase, train, alg)[0].params
                done = n
            s0 = compute.first_phase(be, spec, P, xt, phase.T)[0]
            on_bound = np.mean(s0[np.arange(len(yt)), yt] <= 0.0)
            out.append(f"{n} steps: target on the bound {on_bound:.2f}, test error {np.mean(s0.argmax(1) != yt) * 100:.0f}%")
        print(f"eb-1h {flavor} {alg} | " + " | ".join(out), flush=True)
