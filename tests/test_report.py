"""Report rendering on small synthetic tables of the real schema (tests the rendering, not the physics)."""

from __future__ import annotations

import re

import pytest

from epbench import figures, paper
from epbench.report import render_report, summarize_gdu, summarize_theorem1, summarize_training
from epbench.results import read_table, to_frame, write_meta, write_table

PROV = dict(run_id="r1", epbench_version="0.1.0", git_commit="abc1234", git_dirty=True, suite="smoke",
            suite_hash="h123", backend="torch-cpu", framework="torch", framework_version="2.3.0", device="cpu",
            start_time="2024-01-01T00:00:00Z")
EB1H = "eb 784-512-10 tanh dt=0.08 {}"
P1H = "p 784-512-10 tanh dt={} {}"
TOY = "toy 10-50-5 tanh dt=0.08 {}"

#: final test errors per trial (by hand: EP 2.20 ± 0.20, BPTT 2.20 ± 0.17; published EB-1h 2.06 / 2.11)
EP_FINAL = [2.0, 2.2, 2.4]
BPTT_FINAL = [2.1, 2.1, 2.4]


def _model_columns(desc):
    """The model columns the runner writes beside ``model_desc`` (``experiment_columns``)."""
    kind, arch, activation, dt, _ = desc.split()
    sizes = arch.split("-")
    return dict(model_desc=desc, hidden="-".join(reversed(sizes[1:-1])), n_out=int(sizes[-1]),
                activation=activation, dt=float(dt.removeprefix("dt=")))


def _gdu_rows(exp, model, desc, flavor, T, K, beta, rel, trials=2, symmetric=False, processes=True, B=20):
    rows = []
    base = dict(PROV, experiment=exp, task="gdu", model=model, **_model_columns(desc), flavor=flavor, dataset="mnist",
                dtype="float64", T=T, K=K, beta=beta, symmetric=symmetric, batch_size=B)
    for trial in range(trials):
        common = dict(base, trial=trial, seed=trial, compile_s=0.5, run_s=1.0, wall_time_s=3.0)
        for layer, value in rel.items():
            quantity = "neurons" if layer.startswith("s") else "weights"
            rows.append(dict(common, algorithm="ep_vs_bptt", metric="relmse", layer=layer, quantity=quantity,
                             value=value * (1 + 0.1 * trial)))
            if quantity == "weights":
                rows.append(dict(common, algorithm="ep_vs_bptt", metric="sign_agreement", layer=layer,
                                 quantity=quantity, value=99.0 + trial * 0.5))
                rows.append(dict(common, algorithm="ep_vs_bptt", metric="sign_both_zero", layer=layer,
                                 quantity=quantity, value=0.0))
            rows.append(dict(common, algorithm="ep_vs_bptt", metric="cosine", layer=layer, quantity=quantity,
                             value=0.999))
        rows.append(dict(common, algorithm="ep", metric="convergence", layer="all", quantity="", value=1e-7))
        if processes:
            for layer in ("s0", "s1", "W01", "W1x"):
                quantity = "neurons" if layer.startswith("s") else "weights"
                for unit in (3, 7, 11):
                    for t in range(6):
                        for algo in ("ep", "bptt"):
                            rows.append(dict(common, algorithm=algo, metric="process", layer=layer,
                                             quantity=quantity, t=t, unit=unit, value=0.01 * unit / (t + 1)))
    return rows


def _train_rows(exp, final_ep, final_bptt, epochs=3):
    rows = []
    base = dict(PROV, experiment=exp, task="train", model="eb", **_model_columns("eb 784-512-10 sigmoid dt=0.2 paper"),
                flavor="paper", dataset="mnist-5k", dtype="float32", T=100, K=12, beta=0.5, epochs=epochs,
                batch_size=20)
    for algo, finals in (("ep", final_ep), ("bptt", final_bptt)):
        for trial, final in enumerate(finals):
            common = dict(base, trial=trial, seed=trial, algorithm=algo, layer="", quantity="", wall_time_s=10.0)
            for epoch in range(epochs):
                later = epochs - 1 - epoch
                t = dict(common, epoch=epoch, compile_s=0.2 if epoch == 0 else 0.0, run_s=2.0)
                rows.append(dict(t, metric="test_error", value=final + 3.0 * later))
                rows.append(dict(t, metric="train_error", value=final / 2 + 4.0 * later))
                rows.append(dict(t, metric="diverged", value=0.0))
                rows.append(dict(t, metric="epoch_time_s", value=2.0))
    return rows


def _sweep_rows():
    """A β sweep as a suite's ``sweep`` expands it: one experiment name, several variants."""
    rows = []
    for flavor, symmetric, power, floor in (("paper", False, 1, 0.0), ("paper", True, 2, 0.0),
                                            ("official-code", False, 1, 0.04)):
        exp = "toy"
        for beta in (1e-2, 1e-3, 1e-4):
            value = 3.0 * beta ** power + floor
            rows += _gdu_rows(exp, "toy", TOY.format(flavor), flavor, 5000, 80, beta,
                              {"s0": value, "s1": value, "W01": value, "W0x": value, "W1x": value},
                              trials=1, symmetric=symmetric, processes=False, B=1)
    return rows


def _all_rows():
    rows = _gdu_rows("eb-1h", "eb", EB1H.format("paper"), "paper", 800, 80, 0.001,
                     {"s0": 0.003, "s1": 0.013, "W01": 0.02, "W1x": 0.013})
    rows += _gdu_rows("eb-1h-official", "eb", EB1H.format("official-code"), "official-code", 800, 80, 0.001,
                      {"s0": 0.003, "s1": 0.049, "W01": 0.043, "W1x": 0.049, "b0": 0.01, "b1": 0.02},
                      processes=False)
    rows += _gdu_rows("p-1h-official", "p", P1H.format(1, "official-code"), "official-code", 150, 10, 0.01,
                      {"s0": 0.012, "s1": 0.9, "W01": 0.08, "W1x": 0.08}, processes=False)
    rows += _sweep_rows()
    rows += _train_rows("eb-1h-train", EP_FINAL, BPTT_FINAL)
    return rows


def _meta(reductions):
    return dict(suite="smoke", suite_path="suites/smoke.yaml", suite_hash="h123", backend="torch-cpu", device="cpu",
                framework="torch", framework_version="2.3.0", epbench_version="0.1.0", git_commit="abc1234",
                git_dirty=True, command="epbench run suites/smoke.yaml --backend torch-cpu --quick",
                started="2024-01-01T00:00:00Z", finished="2024-01-01T00:10:00Z", quick=bool(reductions),
                overrides=["epochs=3"], reductions=reductions,
                skipped=[{"experiment": "p-conv", "reason": "backend lacks conv"}],
                host={"platform": "linux", "cpu": "x86_64", "cores": 2})


@pytest.fixture(scope="module")
def frame():
    return to_frame(_all_rows())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, frame):
    d = tmp_path_factory.mktemp("run")
    write_table(d, frame)
    write_meta(d, {**_meta(["dataset mnist-5k instead of mnist", "3 epochs instead of 30"]), "status": "complete"})
    render_report(d)
    return d


@pytest.fixture(scope="module")
def report(run_dir):
    return (run_dir / "report.md").read_text()


def test_preset_key():
    assert paper.preset_key("eb-1h-official") == "eb-1h"
    assert paper.preset_key("p-conv-b1") == "p-conv"
    assert paper.preset_key("toy") == "toy"
    row = {"experiment": "custom", "model": "p", "model_desc": "p 784-512-512-10 sigmoid dt=1 paper"}
    assert paper.preset_key(row) == "p-2h"
    assert paper.preset_key({"experiment": "x", "model": "pconv", "model_desc": ""}) == "p-conv"
    assert paper.preset_key("mystery") is None


def test_header_and_sections(report):
    assert report.startswith("# epbench report: smoke")
    for text in ("torch-cpu", "torch 2.3.0", "float64, float32", "abc1234 (dirty", "2024-01-01T00:00:00Z",
                 "epbench run suites/smoke.yaml --backend torch-cpu --quick", "`epochs=3`"):
        assert text in report, text
    for section in ("## Reduced run", "## Skipped experiments", "## GDU property", "## Theorem 1",
                    "## Training on mnist-5k", "### Settings (Table 4)", "### Final errors (Table 1)", "## Timing"):
        assert section in report, section
    assert "- dataset mnist-5k instead of mnist" in report
    assert "not comparable" in report
    assert "| p-conv | backend lacks conv |" in report


def test_timing_table(report):
    # training: 2 algorithms x 3 epochs x run_s 2.0, compile 0.2 in each algorithm's first epoch
    assert "| eb-1h-train | 0 | train | 10.0 | 0.40 | 12.00 | 2.00 | 2.00 |" in report
    # GDU: one measurement per trial, its timings repeated on every row
    assert "| eb-1h | 1 | gdu | 3.0 | 0.50 | 1.00 | — | — |" in report
    # a sweep keeps its name: 9 variants of 3.0 s each
    assert "| toy | 0 | gdu | 27.0 | 4.50 | 9.00 |" in report


def test_no_warning_without_reductions(tmp_path, frame):
    write_table(tmp_path, frame[frame["task"] == "train"])
    write_meta(tmp_path, _meta([]))
    text = render_report(tmp_path).read_text()
    assert "Reduced run" not in text and "Warning" not in text


def test_table1_numbers(report, frame):
    summary = summarize_training(frame).set_index("experiment")
    row = summary.loc["eb-1h-train"]
    assert row["n_ep"] == 3 and row["epochs_run"] == 3
    assert row["ep_test_mean"] == pytest.approx(2.2)
    assert row["ep_test_std"] == pytest.approx(0.2)
    assert row["ep_train_mean"] == pytest.approx(1.1)
    assert row["paper_ep_test"] == 2.06
    assert row["diff_ep_test"] == pytest.approx(0.14)
    line = next(l for l in report.splitlines() if l.startswith("| eb-1h-train | 3 |"))
    for text in ("2.20 ± 0.20 (n=3)", "1.10", "2.20 ± 0.17 (n=3)", "2.06 ± 0.17", "2.11 ± 0.09", "+0.14", "+0.09",
                 "dataset mnist-5k", "3 of 30 epochs"):
        assert text in line, text
    settings = next(l for l in report.splitlines() if l.startswith("| eb-1h-train | paper | sigmoid"))
    assert "0.1-0.05" in settings and "epochs 3 (paper 30)" in settings


def test_gdu_table_and_sanity(report, frame):
    summary = summarize_gdu(frame).set_index("experiment")
    assert summary.loc["eb-1h", "relmse_s1"] == pytest.approx(0.013 * 1.05)
    assert summary.loc["eb-1h", "sign_min"] == pytest.approx(99.25)
    assert summary.loc["eb-1h-official", "sanity"] == "in range"
    assert summary.loc["p-1h-official", "sanity"] == "out of range"
    assert "s1" in summary.loc["p-1h-official", "sanity_detail"]
    assert summary.loc["eb-1h", "sanity"] == ""
    assert summary.loc["eb-1h", "table3"] == "= Table 3"
    line = next(l for l in report.splitlines() if l.startswith("| eb-1h-official |"))
    assert f"s0 {0.003 * 1.05:.2g}, s1 {0.049 * 1.05:.2g}" in line and "in range" in line and "1e-07" in line
    assert "| p-1h-official |" in report and f"out of range: s1 {0.9 * 1.05:.2g} (ref 0.09)" in report
    assert "### Paper flavour vs official-code flavour" in report
    toy = summarize_gdu(frame)
    toy = toy[toy["experiment"] == "toy"]
    assert len(toy) == 9 and set(toy["flavor"]) == {"paper", "official-code"}  # variants kept apart
    assert "**Toy** (β = 0.01), RelMSE: s0 0.03 paper vs 0.07 official code" in report
    assert "s1 0.014 paper vs 0.051 official code" in report and "σ'(s⁰)" in report


def test_theorem1_summary(frame):
    t1 = summarize_theorem1(frame)
    slopes = t1.groupby(["flavor", "symmetric"])["slope"].first()
    assert slopes[("paper", False)] == pytest.approx(1.0)
    assert slopes[("paper", True)] == pytest.approx(2.0)
    assert slopes[("official-code", False)] < 0.2
    assert set(t1["family"]) == {"toy T=5000 K=80 float64"}


def test_figures_exist_and_embedded(run_dir, report):
    names = {p.name for p in (run_dir / "figures").iterdir()}
    stems = ["relmse-bars", "process-eb-1h", "training-curves",
             "theorem1-toy-T-5000-K-80-float64"]
    for stem in stems:
        assert f"{stem}.png" in names and f"{stem}.svg" not in names, stem  # SVG only on request
        assert f"(figures/{stem}.png)" in report
    assert "process-eb-1h-official.png" not in names  # no process rows for it
    assert (run_dir / "figures" / "relmse-bars.png").read_bytes()[:4] == b"\x89PNG"


def test_rerender_leaves_results_untouched(tmp_path, frame):
    run_dir = tmp_path
    write_table(run_dir, frame[frame["experiment"] == "eb-1h-train"])
    write_meta(run_dir, _meta(["1 epoch instead of 30"]))
    render_report(run_dir)
    parquet = run_dir / "results.parquet"
    before = (parquet.stat().st_mtime_ns, parquet.read_bytes(), (run_dir / "results.csv.gz").read_bytes())
    (run_dir / "figures" / "stale.png").write_bytes(b"x")
    first = (run_dir / "report.md").read_text()
    render_report(run_dir)
    assert (parquet.stat().st_mtime_ns, parquet.read_bytes(), (run_dir / "results.csv.gz").read_bytes()) == before
    assert (run_dir / "report.md").read_text() == first
    assert not (run_dir / "figures" / "stale.png").exists()


def _data_lines(ax):
    return [l for l in ax.get_lines() if l.get_gid() == "data"]


def test_training_curve_content(tmp_path, frame):
    df = frame[frame["task"] == "train"]
    fig = figures.training_curves(df, tmp_path / "tc", formats=("png", "svg"))
    assert (tmp_path / "tc.png").exists() and (tmp_path / "tc.svg").exists()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    assert {ax.get_ylabel() for ax in axes} == {"train error (%)", "test error (%)"}
    for ax in axes:
        assert ax.get_xlabel() == "epoch"
        assert sorted(l.get_label() for l in ax.get_lines()) == ["BPTT", "EP"]
        assert "T=100" in ax.get_title() and "mnist-5k" in ax.get_title() and "float32" in ax.get_title()
    test_ax = next(ax for ax in axes if ax.get_ylabel().startswith("test"))
    ep = next(l for l in test_ax.get_lines() if l.get_label() == "EP")
    assert list(ep.get_xdata()) == [0, 1, 2] and ep.get_ydata()[-1] == pytest.approx(2.2)


def test_theorem1_figure_content(tmp_path, frame):
    df = frame[frame["experiment"] == "toy"]
    fig = figures.theorem1_plot(df, tmp_path / "t1")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "β" in ax.get_xlabel() and "RelMSE" in ax.get_ylabel()
    labels = [l.get_label() for l in _data_lines(ax)]
    assert len(labels) == 3
    assert any(l.startswith("paper, one-sided") for l in labels)
    assert any(l.startswith("paper, symmetric") for l in labels)
    assert any(l.startswith("official-code, one-sided") for l in labels)
    assert {l.get_label() for l in ax.get_lines() if l.get_gid() == "reference"} == {"∝ β", "∝ β²"}
    assert "slope 1.00" in " ".join(labels) and "slope 2.00" in " ".join(labels)


def test_process_figure_content(tmp_path, frame):
    df = frame[(frame["experiment"] == "eb-1h") & (frame["metric"] == "process")]
    fig = figures.gdu_processes(df, tmp_path / "proc")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in axes) == ["W01 (weights)", "W1x (weights)", "s0 (neurons)",
                                                     "s1 (neurons)"]
    for ax in axes:
        lines = _data_lines(ax)
        assert len(lines) == 3 * 2  # 3 sampled units x (ΔEP, −∇BPTT)
        assert sum(l.get_linestyle() == "-" for l in lines) == 3
        assert sum(l.get_linestyle() == "--" for l in lines) == 3
        assert "t" in ax.get_xlabel() and "ΔEP" in ax.get_ylabel() and "BPTT" in ax.get_ylabel()
        assert len({l.get_color() for l in lines}) == 3
    assert "T=800" in fig.get_suptitle() and "β=0.001" in fig.get_suptitle()


def test_relmse_bars_content(tmp_path, frame):
    df = frame[frame["experiment"].isin(["eb-1h", "eb-1h-official"])]
    fig = figures.relmse_bars(df, tmp_path / "bars", log=True)
    neurons, weights = fig.axes[:2]
    assert neurons.get_yscale() == "log" and "RelMSE" in neurons.get_ylabel()
    assert "neurons" in neurons.get_title() and "weights" in weights.get_title()
    assert [t.get_text() for t in neurons.get_xticklabels()] == ["eb-1h", "eb-1h-official"]
    assert len(neurons.patches) == 4  # s0, s1 for two experiments


def test_report_uses_only_table_numbers(tmp_path, frame):
    """Changing a value in the table changes the report."""
    df = frame[frame["task"] == "train"].reset_index(drop=True)
    mask = (df["experiment"] == "eb-1h-train") & (df["metric"] == "test_error") & (df["algorithm"] == "ep") \
        & (df["epoch"] == 2) & (df["trial"] == 0)
    df.loc[mask, "value"] = 5.0
    write_table(tmp_path, df)
    write_meta(tmp_path, _meta([]))
    text = render_report(tmp_path).read_text()
    mean = (5.0 + 2.2 + 2.4) / 3
    assert re.search(rf"{mean:.2f} ± \d\.\d\d \(n=3\)", text)
    assert read_table(tmp_path).equals(df)


def test_csv_fallback_and_missing_algorithm(tmp_path, frame):
    """A run holding only results.csv (empty strings read back as NaN) still summarizes; an
    experiment that did not train an algorithm of the table has none of its trials."""
    import pandas as pd

    other = to_frame(_train_rows("eb-1h-other", EP_FINAL, BPTT_FINAL))
    df = pd.concat([frame[~((frame["task"] == "train") & (frame["algorithm"] == "bptt"))], other])
    (tmp_path / "results.csv").write_text(df.to_csv(index=False))
    back = read_table(tmp_path)
    train = summarize_training(back).set_index("experiment").loc["eb-1h-train"]
    assert train["n_bptt"] == 0 and train["ep_test_mean"] == pytest.approx(2.2)
    assert "no BPTT run" in train["not_comparable"]
    gdu = summarize_gdu(back).set_index("experiment")
    assert gdu.loc["eb-1h-official", "sanity"] == "in range"


def test_incomplete_run_warning(tmp_path, frame):
    write_table(tmp_path, frame[frame["experiment"] == "eb-1h-train"])
    write_meta(tmp_path, {**_meta([]), "status": "interrupted"})
    text = render_report(tmp_path).read_text()
    assert "Run status: interrupted" in text and "Reduced run" not in text


def test_variant_labels(frame):
    df = frame[(frame["experiment"] == "toy") & (frame["metric"] == "relmse")]
    labels = set(figures.variant_labels(df))
    assert "toy · paper · ±β=0.001" in labels and "toy · official-code · β=0.01" in labels
    assert len(labels) == 9
    assert set(figures.variant_labels(frame[frame["experiment"] == "eb-1h"])) == {"eb-1h"}


def test_svg_on_request_and_removed_when_not(tmp_path, run_dir):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    render_report(copy, svg=True)
    svgs = sorted(p.stem for p in (copy / "figures").glob("*.svg"))
    assert svgs == sorted(p.stem for p in (copy / "figures").glob("*.png"))
    assert (copy / "figures" / "relmse-bars.svg").read_text().lstrip().startswith("<?xml")
    assert "figures/*.svg" in (copy / "report.md").read_text()
    render_report(copy)  # a rendering without SVG leaves none of the old ones behind
    assert not list((copy / "figures").glob("*.svg"))


def test_one_epoch_shows_final_error_bars(tmp_path, frame):
    """One epoch has no curve: bars of the final errors, EP beside BPTT per experiment."""
    import pandas as pd

    df = frame[(frame["task"] == "train") & (frame["epoch"] == 1)]
    other = df.assign(experiment="p-1h-train", value=df["value"] + 10.0)
    fig = figures.training_curves(pd.concat([df, other]), tmp_path / "tc")
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["train error (%)", "test error (%)"]
    assert not any(_data_lines(ax) for ax in axes)
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["eb-1h-train", "p-1h-train"]
        assert "after epoch 1" in ax.get_title()
        assert sorted(ax.get_legend_handles_labels()[1]) == ["BPTT", "EP"]
    test_ax = axes[1]
    ep = next(c for c in test_ax.containers if c.get_label() == "EP")
    heights = [bar.get_height() for bar in ep.patches]
    expected = df[(df["metric"] == "test_error") & (df["algorithm"] == "ep")]["value"].mean()
    assert heights == pytest.approx([expected, expected + 10.0])

