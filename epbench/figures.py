"""Figures of a run, drawn from the tidy results table (see :mod:`epbench.results`).

Every function takes the table (already filtered as needed) and an output path stem, saves
``<stem>.png`` (and ``<stem>.svg`` with ``formats=("png", "svg")``) and returns the
:class:`matplotlib.figure.Figure`. Figures are built without pyplot (Agg canvas, no global
state), so they work headless and in threads; ``close=True`` empties the figure after saving to
free its memory at once. Drawing is kept cheap: PNG only unless SVG is asked for, and fixed
margins in inches instead of a layout engine (which measures every text before drawing).

Data lines carry ``gid='data'``; faint reference lines ``gid='reference'``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from epbench.results import (REFERENCE, algorithm_label, algorithms_in, atomic_write_bytes, compared_algorithm,
                             comparison_name)

#: how the processes of the built-in algorithms are written (others: "<NAME>(t)")
PROCESS_LABEL = {"ep": "ΔEP"}
RELMSE_LABEL = "RelMSE(process, sign·∇BPTT) (ratio of RMS norms)"
#: line styles of the compared algorithms' processes, in order; BPTT's is dashed
PROCESS_STYLES = ("-", ":", "-.")


def algo_color(algorithm: str, algorithms: list[str]) -> str:
    """Matplotlib's default colour cycle by the algorithm's place in ``algorithms`` (EP, BPTT:
    tab:blue, tab:orange)."""
    i = list(algorithms).index(algorithm) if algorithm in algorithms else len(algorithms)
    return f"C{i % 10}"


def process_sign(algorithm: str) -> float | None:
    """The sign with which a registered algorithm's processes estimate BPTT's (None if it is not
    registered here)."""
    try:
        from epbench.plugins import algorithms

        found = algorithms().get(algorithm)
    except Exception:  # noqa: BLE001 - figures of a stored table never need the plugins
        found = None
    return None if found is None else float(getattr(found, "process_sign", 1.0))


def process_label(algorithm: str, compared: list[str]) -> str:
    """ΔEP for EP; for BPTT, ∇BPTT with the sign of the first compared algorithm (the runner
    stores BPTT's samples so: −∇BPTT beside ΔEP); ``<NAME>`` otherwise."""
    if algorithm == REFERENCE:
        sign = process_sign(compared[0]) if compared else 1.0
        return {None: "±∇BPTT", -1.0: "−∇BPTT"}.get(sign, "∇BPTT")
    return PROCESS_LABEL.get(algorithm, algorithm_label(algorithm))


def relmse_label(compared: list[str]) -> str:
    """'RelMSE(ΔEP, −∇BPTT)' for one compared algorithm, a generic label for several."""
    if len(compared) == 1:
        return f"RelMSE({process_label(compared[0], compared)}, {process_label(REFERENCE, compared)})"
    return "RelMSE(process, sign·∇BPTT)"


def comparison_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The GDU rows comparing an algorithm's processes with BPTT's (``<name>_vs_bptt``)."""
    if df.empty:
        return df
    return df[df["algorithm"].map(lambda a: compared_algorithm(a) is not None)]


# ----- helpers ----------------------------------------------------------------------------------
#: what a figure is saved as unless asked otherwise (SVG on request: it costs as much again)
FORMATS: tuple[str, ...] = ("png",)
DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _grid(fig: Figure, nrows: int, ncols: int, *, left: float = 0.8, right: float = 0.25,
          top: float = 0.6, bottom: float = 0.55, wgap: float = 0.8, hgap: float = 0.8):
    """An (nrows, ncols) GridSpec with fixed margins and gaps in inches."""
    width, height = fig.get_size_inches()
    axes_w = max(0.1, (width - left - right - (ncols - 1) * wgap) / ncols)
    axes_h = max(0.1, (height - top - bottom - (nrows - 1) * hgap) / nrows)
    return fig.add_gridspec(nrows, ncols, left=left / width, right=1 - right / width, bottom=bottom / height,
                            top=1 - top / height, wspace=wgap / axes_w, hspace=hgap / axes_h)


def _subplots(fig: Figure, nrows: int, ncols: int, **margins):
    """An (nrows, ncols) array of axes laid out by :func:`_grid`."""
    return _grid(fig, nrows, ncols, **margins).subplots(squeeze=False)


def save_figure(fig: Figure, stem: str | os.PathLike, close: bool = False,
                formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write ``stem.<format>`` for each of ``formats`` (png, svg) atomically (SVG deterministic);
    return the paths."""
    stem = Path(stem)
    meta = {"png": {"Software": None}, "svg": {"Date": None}}
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "epbench", "svg.fonttype": "path"}):
        for fmt in formats:
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, metadata=meta[fmt])
            path = stem.with_name(stem.name + "." + fmt)
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
    if close:  # drop the axes without Figure.clear(), which first resets each of them (slow)
        for ax in tuple(fig.axes):
            fig.delaxes(ax)
        fig.legends.clear()
    return paths


def _title(ax, text: str, **kw) -> None:
    """An axes title at a fixed height (matplotlib otherwise measures the tick labels of every
    axes at each drawing to place it)."""
    ax.set_title(text, y=1.0, pad=5, **kw)


def _values(df: pd.DataFrame, column: str) -> list:
    if column not in df or df.empty:
        return []
    def present(v) -> bool:
        return v not in ("", None, -1) and not (isinstance(v, float) and math.isnan(v))

    return sorted({v for v in df[column].tolist() if present(v)}, key=str)


def _fmt_set(values: list) -> str:
    if not values:
        return "?"
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        values = sorted(values)
        text = [f"{v:g}" for v in values]
        return text[0] if len(text) == 1 else (", ".join(text) if len(text) <= 4 else f"{text[0]}…{text[-1]}")
    return ", ".join(str(v) for v in values)


def _datasets(df: pd.DataFrame) -> str:
    """The datasets of a table, in order of appearance ("mnist-5k", "fashion-mnist", ...)."""
    return ", ".join(dict.fromkeys(str(d) for d in df["dataset"])) if "dataset" in df else "?"


def settings_text(df: pd.DataFrame, keys=("T", "K", "beta", "dataset", "backend", "dtype")) -> str:
    """'T=100 · K=12 · β=0.5 · mnist · torch-cpu · float32' from the distinct values of ``df``."""
    names = {"T": "T=", "K": "K=", "beta": "β=", "epochs": "epochs=", "batch_size": "batch="}
    parts = []
    for key in keys:
        vals = _values(df, key)
        if vals:
            parts.append(names.get(key, "") + _fmt_set(vals))
    return " · ".join(parts)


#: the columns telling apart the variants of one experiment (a suite's sweep keeps its name)
VARIANT = ["experiment", "flavor", "symmetric", "beta"]


def variant_labels(df: pd.DataFrame, sep: str = " · ") -> pd.Series:
    """Per row: the experiment name, plus the flavour and β (±β when symmetric) where the
    experiment holds several of them."""
    if df.empty:
        return pd.Series([], index=df.index, dtype=object)
    counts = df.groupby("experiment")[["flavor", "symmetric", "beta"]].nunique()
    labels = []
    for exp, flavor, sym, beta in zip(df["experiment"], df["flavor"], df["symmetric"], df["beta"]):
        n = counts.loc[exp]
        parts = [str(exp)]
        if n["flavor"] > 1:
            parts.append(str(flavor))
        if n["beta"] > 1 or n["symmetric"] > 1:
            parts.append(("±β=" if sym else "β=") + f"{abs(beta):g}")
        labels.append(sep.join(parts))
    return pd.Series(labels, index=df.index, dtype=object)


def _layer_order(name: str) -> tuple:
    """s0, s1, ... then W01, W12, ..., W1x, ... then biases: output side first."""
    kind = {"s": 0, "W": 1, "b": 2}.get(name[:1], 3)
    digits = "".join(ch for ch in name[1:] if ch.isdigit())
    return (kind, int(digits[:1]) if digits else 99, name.endswith("x"), name)


def sort_layers(names) -> list[str]:
    return sorted(set(names), key=_layer_order)


# ----- training curves (Figs 17-22) -----------------------------------------------------------
def training_curves(df: pd.DataFrame, stem: str | os.PathLike, close: bool = False,
                    formats: tuple[str, ...] = FORMATS) -> Figure:
    """Train and test error (%) per epoch, mean ± std over trials, the algorithms side by side.

    One row per experiment (variant), columns train | test; each axes holds one line per
    algorithm (those of the table's ``algorithm`` column). A run of a single epoch has no curve to show: :func:`final_error_bars` instead.
    """
    df = df[df["metric"].isin(["train_error", "test_error"])]
    if df.empty or df["epoch"].nunique() <= 1:
        return final_error_bars(df, stem, close, formats)
    df = df.assign(panel=variant_labels(df))
    experiments = list(dict.fromkeys(df["panel"]))
    algos = algorithms_in(df)
    rows = max(1, len(experiments))
    fig = _new_figure(10, 2.9 * rows + 0.4)
    axes = _subplots(fig, rows, 2, top=0.95, hgap=1.05)
    for r, exp in enumerate(experiments):
        sub = df[df["panel"] == exp]
        for c, metric in enumerate(("train_error", "test_error")):
            ax = axes[r][c]
            part = sub[sub["metric"] == metric]
            for algo in algos:
                rows_a = part[part["algorithm"] == algo]
                if rows_a.empty:
                    continue
                stats = rows_a.groupby("epoch")["value"].agg(["mean", "std"]).sort_index()
                x = stats.index.to_numpy()
                mean = stats["mean"].to_numpy()
                std = stats["std"].fillna(0.0).to_numpy()
                color = algo_color(algo, algos)
                ax.plot(x, mean, color=color, label=algorithm_label(algo), marker="o", ms=3, gid="data")
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
            what = "train" if metric == "train_error" else "test"
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(f"{what} error (%)")
            _title(ax, f"{exp} — {what} error (mean ± std; {_trials_text(part)})\n"
                         f"{settings_text(sub, ('T', 'K', 'beta', 'dataset', 'backend', 'dtype'))}", fontsize=8)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"Training on {_datasets(df)}: {' vs '.join(algorithm_label(a) for a in algos)} "
                 "(cf. paper Figs 17-22)", fontsize=10)
    save_figure(fig, stem, close, formats)
    return fig


def _trials_text(part: pd.DataFrame) -> str:
    """'EP n=5, BPTT n=5': trials per algorithm, in the table's order."""
    n = part.groupby("algorithm")["trial"].nunique().to_dict() if not part.empty else {}
    order = algorithms_in(part)
    return ", ".join(f"{algorithm_label(a)} n={n[a]}" for a in order if a in n)


def final_error_bars(df: pd.DataFrame, stem: str | os.PathLike, close: bool = False,
                     formats: tuple[str, ...] = FORMATS) -> Figure:
    """Train | test error (%) at the last epoch: per experiment (variant) one bar per algorithm
    (EP beside BPTT), mean over trials with the std as error bar and the mean written above."""
    df = df[df["metric"].isin(["train_error", "test_error"])]
    if not df.empty:
        last = df.groupby(VARIANT, dropna=False)["epoch"].transform("max")
        df = df[df["epoch"] == last]
    df = df.assign(panel=variant_labels(df))
    experiments = list(dict.fromkeys(df["panel"]))
    algos = algorithms_in(df)
    width = 0.76 / max(1, len(algos))
    fig = _new_figure(min(16.0, max(10.0, 0.8 * len(algos) * len(experiments) + 2)), 4.2)
    axes = _subplots(fig, 1, 2, top=0.85, bottom=0.7)[0]
    epochs = _fmt_set(_values(df, "epoch"))
    for ax, metric in zip(axes, ("train_error", "test_error")):
        part = df[df["metric"] == metric]
        stats = part.groupby(["panel", "algorithm"])["value"].agg(["mean", "std"])
        for j, algo in enumerate(algos):
            xs, ys, es = [], [], []
            for g, exp in enumerate(experiments):
                if (exp, algo) in stats.index:
                    xs.append(g + (j - (len(algos) - 1) / 2) * width)
                    ys.append(stats.loc[(exp, algo), "mean"])
                    es.append(np.nan_to_num(stats.loc[(exp, algo), "std"]))
            if xs:
                bars = ax.bar(xs, ys, width=width * 0.95, yerr=es, capsize=2, color=algo_color(algo, algos),
                              label=algorithm_label(algo), gid="data")
                ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        what = "train" if metric == "train_error" else "test"
        ax.set_xticks(range(len(experiments)), experiments, fontsize=8,
                      rotation=0 if len(experiments) < 5 else 30)
        ax.set_ylabel(f"{what} error (%)")
        _title(ax, f"{what} error after epoch {epochs} (mean ± std; {_trials_text(part)})\n"
                     f"{settings_text(df, ('dataset', 'backend', 'dtype'))}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
        if ax.patches:
            ax.legend(fontsize=8)
    fig.suptitle(f"Training on {_datasets(df)}: final errors, {' beside '.join(algorithm_label(a) for a in algos)} "
                 "(cf. paper Table 1)", fontsize=10)
    save_figure(fig, stem, close, formats)
    return fig


# ----- GDU processes (Figs 2, 4, 8-13) -----------------------------------------------------------
def gdu_processes(df: pd.DataFrame, stem: str | os.PathLike, close: bool = False,
                  formats: tuple[str, ...] = FORMATS) -> Figure:
    """Each algorithm's process (ΔEP(t): solid; others dotted, dash-dotted) and BPTT's as the runner
    stored it (−∇BPTT(t) beside EP: dashed) against t for the sampled units of every layer.

    Top row: neuron layers; bottom row: parameter layers. One colour per unit. Uses the first
    variant (experiment, flavour, nudging, β) and trial found in ``df`` (metric ``process``).
    """
    df = df[df["metric"] == "process"]
    if not df.empty:
        first = df.iloc[0]
        for column in VARIANT:
            df = df[df[column] == first[column]]
        df = df[df["trial"] == df["trial"].min()]
    compared = [a for a in algorithms_in(df) if a != REFERENCE]
    drawn = compared + ([REFERENCE] if REFERENCE in algorithms_in(df) else [])
    style = {a: PROCESS_STYLES[i % len(PROCESS_STYLES)] for i, a in enumerate(compared)}
    style[REFERENCE] = "--"
    label = {a: process_label(a, compared) for a in drawn}
    neuron_layers = sort_layers(df.loc[df["quantity"] == "neurons", "layer"]) if not df.empty else []
    weight_layers = sort_layers(df.loc[df["quantity"] != "neurons", "layer"]) if not df.empty else []
    ncols = max(1, len(neuron_layers), len(weight_layers))
    nrows = (1 if neuron_layers else 0) + (1 if weight_layers else 0) or 1
    fig = _new_figure(3.4 * ncols, 2.5 * nrows + 1.3)
    cells = _grid(fig, nrows, ncols, top=0.75, bottom=0.85, wgap=0.85, hgap=0.75)
    grid = [layers for layers in (neuron_layers, weight_layers) if layers] or [[]]
    colors = matplotlib.colormaps["tab10"]
    lines = {key: part.sort_values("t") for key, part in
             df[["layer", "unit", "algorithm", "t", "value"]].groupby(["layer", "unit", "algorithm"])}
    units: dict = {}
    for layer, unit, _ in lines:
        units.setdefault(layer, set()).add(unit)
    for r, layers in enumerate(grid):
        for c, layer in enumerate(layers):  # only the cells in use get axes
            ax = fig.add_subplot(cells[r, c])
            quantity = "neurons" if layer in neuron_layers else "weights"
            for i, unit in enumerate(sorted(units.get(layer, ()))):
                for algo in drawn:
                    line = lines.get((layer, unit, algo))
                    if line is None:
                        continue
                    ax.plot(line["t"].to_numpy(), line["value"].to_numpy(), style[algo],
                            color=colors(i % 10), lw=1.2, label=f"{label[algo]} unit {unit}", gid="data")
            ax.axhline(0.0, color="0.6", lw=0.5, gid="reference")
            _title(ax, f"{layer} ({quantity})", fontsize=9)
            ax.set_xlabel("t (time step of the second phase)")
            ax.set_ylabel(", ".join(f"{label[a]}(t)" for a in drawn) + " (a.u.)")
            ax.xaxis.set_major_locator(MaxNLocator(5, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(5))
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.grid(alpha=0.3)
    names = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dotted"}
    handles = [Line2D([], [], color="k", ls=style[a], label=f"{label[a]}(t) ({names[style[a]]})") for a in drawn]
    fig.legend(handles=handles, loc="lower center", ncols=max(1, len(handles)), fontsize=8)
    name = df["experiment"].iloc[0] + (" (symmetric ±β)" if df["symmetric"].iloc[0] else "") if not df.empty else ""
    desc = df["model_desc"].iloc[0] if not df.empty and "model_desc" in df else ""
    fig.suptitle(f"GDU processes: {name} ({desc})\n{settings_text(df)}; one colour per sampled unit",
                 fontsize=10)
    save_figure(fig, stem, close, formats)
    return fig


# ----- RelMSE bars (Figs 3, 15) -------------------------------------------------------------------
def relmse_bars(df: pd.DataFrame, stem: str | os.PathLike, log: bool = True, close: bool = False,
                formats: tuple[str, ...] = FORMATS) -> Figure:
    """RelMSE per layer, neurons (top) and parameters (bottom): one group of bars per experiment
    variant (see :func:`variant_labels`) and compared algorithm (named when the table compares
    several), mean over trials with the std as error bar."""
    df = comparison_rows(df[df["metric"] == "relmse"]).copy()
    compared = algorithms_in(df, comparisons=True)
    df["group"] = variant_labels(df, sep="\n")
    if len(compared) > 1:
        df["group"] = df["group"] + "\n" + df["algorithm"].map(lambda a: algorithm_label(compared_algorithm(a)))
    groups = list(dict.fromkeys(df["group"]))
    fig = _new_figure(min(16.0, max(7.0, 0.9 * len(groups) + 3)), 7.5)
    axes = _subplots(fig, 2, 1, top=0.6, right=1.0, bottom=0.95, hgap=1.25)[:, 0]
    colors = matplotlib.colormaps["tab20"]
    for ax, quantity in zip(axes, ("neurons", "weights")):
        part = df[(df["quantity"] == "neurons") == (quantity == "neurons")]
        layers = sort_layers(part["layer"]) if not part.empty else []
        width = 0.8 / max(1, len(layers))
        stats = part.groupby(["group", "layer"])["value"].agg(["mean", "std"]) if not part.empty else None
        for j, layer in enumerate(layers):
            xs, ys, es = [], [], []
            for g, group in enumerate(groups):
                if stats is not None and (group, layer) in stats.index:
                    xs.append(g - 0.4 + width * (j + 0.5))
                    ys.append(stats.loc[(group, layer), "mean"])
                    es.append(0.0 if pd.isna(stats.loc[(group, layer), "std"]) else stats.loc[(group, layer), "std"])
            if xs:
                ax.bar(xs, ys, width=width * 0.95, yerr=es, capsize=2, color=colors(j % 20), label=layer)
        ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=0 if len(groups) < 5 else 30)
        ax.set_ylabel(f"{relmse_label(compared)} (ratio of RMS norms)" if quantity == "neurons"
                      else "RelMSE (ratio of RMS norms)")
        ax.set_xlabel("experiment")
        _title(ax, f"{'neurons' if quantity == 'neurons' else 'weights (parameters)'}: RelMSE per layer",
                     fontsize=9)
        if log and not part.empty and (part["value"] > 0).any():
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        if layers:
            ax.legend(fontsize=7, title="layer", title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"RelMSE per layer (cf. paper Figs 3, 15) — {settings_text(df, ('dataset', 'backend', 'dtype'))}",
                 fontsize=10)
    save_figure(fig, stem, close, formats)
    return fig


# ----- Theorem 1: RelMSE against β -----------------------------------------------------------------
def fit_slope(betas, values) -> float:
    """Least-squares slope of log RelMSE against log |β| (NaN with fewer than 2 positive points)."""
    b = np.abs(np.asarray(betas, dtype=float))
    v = np.asarray(values, dtype=float)
    ok = (b > 0) & (v > 0) & np.isfinite(v)
    if len(np.unique(b[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(b[ok]), np.log(v[ok]), 1)[0])


def theorem1_lines(df: pd.DataFrame, layer: str | None = None, quantity: str = "neurons",
                   algorithm: str | None = None) -> pd.DataFrame:
    """RelMSE against |β| per (flavor, symmetric): columns flavor, symmetric, beta, relmse, n.

    ``layer=None`` averages over the layers of ``quantity`` (per trial, then over trials).
    ``algorithm``: whose comparison with BPTT (default: the first the table compares).
    """
    df = comparison_rows(df[df["metric"] == "relmse"])
    if algorithm is None:
        compared = algorithms_in(df, comparisons=True)
        algorithm = compared[0] if compared else ""
    df = df[df["algorithm"] == comparison_name(algorithm)].copy()
    if layer is not None:
        df = df[df["layer"] == layer]
    else:
        df = df[(df["quantity"] == "neurons") == (quantity == "neurons")]
    if df.empty:
        return pd.DataFrame(columns=["flavor", "symmetric", "beta", "relmse", "n"])
    df["beta"] = df["beta"].abs()
    per_trial = df.groupby(["flavor", "symmetric", "beta", "experiment", "trial"])["value"].mean().reset_index()
    out = per_trial.groupby(["flavor", "symmetric", "beta"])["value"].agg(["mean", "count"]).reset_index()
    return out.rename(columns={"mean": "relmse", "count": "n"}).sort_values(["flavor", "symmetric", "beta"])


def line_label(flavor: str, symmetric: bool) -> str:
    return f"{flavor}, {'symmetric ±β' if symmetric else 'one-sided β'}"


def theorem1_plot(df: pd.DataFrame, stem: str | os.PathLike, layer: str | None = None,
                  quantity: str = "neurons", close: bool = False, formats: tuple[str, ...] = FORMATS,
                  algorithm: str | None = None) -> Figure:
    """RelMSE against β on log-log axes, one line per (flavor, symmetric), with faint reference
    slopes β and β² (anchored at the smallest-β point of the first line); ``algorithm``: whose
    comparison with BPTT (default: the first the table compares)."""
    if algorithm is None:
        compared = algorithms_in(comparison_rows(df), comparisons=True)
        algorithm = compared[0] if compared else ""
    lines = theorem1_lines(df, layer, quantity, algorithm)
    fig = _new_figure(6.4, 4.6)
    ax = _subplots(fig, 1, 1, top=0.55, left=0.85)[0][0]
    markers = "osD^v"
    for i, ((flavor, symmetric), part) in enumerate(lines.groupby(["flavor", "symmetric"], sort=True)):
        slope = fit_slope(part["beta"], part["relmse"])
        label = line_label(flavor, bool(symmetric)) + (f" (slope {slope:.2f})" if math.isfinite(slope) else "")
        ax.plot(part["beta"], part["relmse"], marker=markers[i % len(markers)], ls="-" if flavor == "paper" else "--",
                label=label, gid="data")
    positive = lines[(lines["relmse"] > 0) & (lines["beta"] > 0)]
    if not positive.empty:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ylim = ax.get_ylim()
        b = np.array(sorted(positive["beta"].unique()))
        anchor = positive.sort_values(["beta", "relmse"]).iloc[0]  # lowest point at the smallest β
        for power, text, style in ((1, "∝ β", ":"), (2, "∝ β²", "-.")):
            ref = 0.3 * anchor["relmse"] * (b / anchor["beta"]) ** power  # a little below the data
            ax.plot(b, ref, ls=style, color="0.5", alpha=0.6, lw=1, label=text, gid="reference")
        ax.set_ylim(ylim)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("β (nudging strength, |β|)")
    where = f"layer {layer}" if layer else f"mean over {quantity.rstrip('s')} layers"
    ax.set_ylabel(f"{relmse_label([algorithm] if algorithm else [])}, {where}")
    name = ", ".join(dict.fromkeys(df["experiment"])) if "experiment" in df and not df.empty else ""
    settings = settings_text(df, ("T", "K", "dataset", "backend", "dtype"))
    _title(ax, f"Theorem 1: RelMSE → 0 as β → 0 — {name}\n{settings}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    save_figure(fig, stem, close, formats)
    return fig
