"""Which ingredient of the official-code flavour lets BPTT learn EB-2h, P-2h and P-3h: the
initialisation scale, or the rest (biases, no σ'(s⁰) on the EB output, BPTT over K+1 steps)?

Table 4 settings, mnist-5k, jax-cpu, seed 0, the runner's data order for trial 1 (so the
flavours' own rows reproduce `epbench run suites/table4.yaml --dataset mnist-5k`); test error
after each epoch for four starting points:

* paper (Glorot): the paper flavour as it is;
* paper, weights at U(±1/√fan_in): the paper flavour from the official code's weight draws
  of the same seed (PyTorch's default scale, 1.7-2.4 times narrower), without biases;
* official-code, weights Glorot: the official-code flavour from the paper's Glorot draws (its
  own biases kept);
* official-code: the official-code flavour as it is.

Usage: python results/flavour-ingredients.py ROWS EPOCHS ALGORITHMS [VARIANTS]
(ROWS, ALGORITHMS and VARIANTS comma-separated; VARIANTS are indices 0-3 of the list above).
"""
import sys
import time

from epbench import presets, training
from epbench.datasets import epoch_order, load_dataset
from epbench.params import init_params
from epbench.plugins import registry

be = registry().backend("jax-cpu")
split = load_dataset("mnist-5k")
rows = sys.argv[1].split(",")
epochs = int(sys.argv[2])
algs = sys.argv[3].split(",")
only = [int(i) for i in sys.argv[4].split(",")] if len(sys.argv) > 4 else [0, 1, 2, 3]
for row in rows:
    sp, phase, train = presets.table4(row, flavor="paper")
    so, _, _ = presets.table4(row, flavor="official-code")
    gp, go = init_params(sp, 0), init_params(so, 0)
    variants = {
        "paper (Glorot)": (sp, gp),
        "paper, weights at U(+-1/sqrt(fan_in))": (sp, {k: go[k] for k in gp}),
        "official-code, weights Glorot": (so, {**go, **{k: gp[k] for k in gp}}),
        "official-code": (so, go),
    }
    for vi, (name, (spec, p)) in enumerate(variants.items()):
        if vi not in only:
            continue
        for alg in algs:
            P = be.from_numpy(spec, p, "float32")
            errs = []
            t0 = time.time()
            for ep in range(1, epochs + 1):
                o = epoch_order(len(split.x_train), 0 * 1_000_003 + ep)
                res = training.train_epochs(be, spec, [P], [split.x_train[o].reshape(-1, 784)], [split.y_train[o]],
                                            phase, train, alg)[0]
                P = res.params
                errs.append(training.evaluate(be, spec, P, split.x_test.reshape(-1, 784), split.y_test, phase.T))
            print(f"{row} | {name} | {alg} | test error per epoch: " + ", ".join(f"{e:.1f}" for e in errs)
                  + f" | {time.time() - t0:.0f} s", flush=True)
