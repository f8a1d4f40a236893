"""Markdown report of a run directory: provenance, GDU (Table 3), Theorem 1, training
(Tables 4 and 1), timing, and the figures of :mod:`epbench.figures`.

``render_report(run_dir)`` reads ``results.parquet`` (or ``.csv``) and ``meta.json``, writes
``report.md`` and ``figures/`` and nothing else; re-rendering replaces only those. Every number
comes from the table, except the published values of :mod:`epbench.paper` (labelled so).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from epbench import figures as figs
from epbench import paper
from epbench.convergence import (DRIFT_SHARE, FIXED_POINT_ULPS, converged_for, drift_ratio, theorem1_prediction,
                                 uses_beta)
from epbench.results import (REFERENCE, algorithm_label, algorithms_in, atomic_write_text, compared_algorithm, comparison_name,
                             read_meta, read_table, safe_name, to_frame)

FIGURES = "figures"
#: the algorithm the paper studies: the GDU magnitudes of Table 3 and of the official code are its
PAPER_ALGORITHM = "ep"
REPORT = "report.md"
LR_COLUMNS = ("lrs", "learning_rates", "lr")


# ----- small helpers -----------------------------------------------------------------------------
def _slug(text: str) -> str:
    """A figure's file-name part: :func:`epbench.results.safe_name` (safe and short; the report's
    text keeps the real name)."""
    return safe_name(text)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _isnum(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _g(v, digits: int = 3) -> str:
    """General format: 0.0031, 0.049, 1.2e-07; '—' when missing."""
    return f"{v:.{digits}g}" if _isnum(v) else "—"


def _f(v, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if _isnum(v) else "—"


def _pm(mean, std, digits: int = 2) -> str:
    if not _isnum(mean):
        return "—"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if _isnum(std) else f"{mean:.{digits}f} ± n/a"


def model_settings(row) -> dict:
    """Activation, dt (ε of EB/toy, leak of P) and the number of classes (``n_out``) of a
    table row, from its columns (``n_out`` 10 where the table does not say)."""
    def column(key, default):
        value = row.get(key, default) if hasattr(row, "get") else default
        return default if value is None or (isinstance(value, float) and math.isnan(value)) else value

    dt = pd.to_numeric(column("dt", float("nan")), errors="coerce")
    n_out = int(pd.to_numeric(column("n_out", -1), errors="coerce") or -1)
    return {"activation": str(column("activation", "")), "dt": float(dt),
            "n_classes": n_out if n_out > 0 else 10}


def _groups(df: pd.DataFrame, keys: list[str]):
    """groupby in order of first appearance."""
    if df.empty:
        return []
    return list(df.groupby(keys, sort=False))


def _layer_means(rows: pd.DataFrame) -> dict[str, float]:
    """Per-layer mean over trials, layers output side first."""
    if rows.empty:
        return {}
    means = rows.groupby("layer")["value"].mean()
    return {layer: float(means[layer]) for layer in figs.sort_layers(means.index)}


def _is_neuron(layer: str) -> bool:
    return str(layer).startswith("s")


# ----- GDU (Table 3) -------------------------------------------------------------------------------
def _sanity(preset: str | None, rel: dict[str, float], batch_size: int, desc: dict, kind: str,
            at_table3: bool = True) -> tuple[str, str]:
    """("in range" | "out of range" | "", detail) against the official code's magnitudes,
    :data:`epbench.paper.SANITY` (official-code rows only)."""
    ref = paper.SANITY.get(preset or "")
    if ref is None:
        return "", "no official-code reference"
    bad, checked = [], 0
    neurons = [l for l in rel if _is_neuron(l)]
    weights = [l for l in rel if l.startswith("W")]
    for i, layer in enumerate(neurons):
        expected = ref.neuron_value(i)
        if expected is None:
            continue
        checked += 1
        if not paper.within_factor(rel[layer], expected, expected):
            bad.append(f"{layer} {_g(rel[layer], 2)} (ref {_g(expected)})")
    for i, layer in enumerate(weights):
        span = ref.weight_range(i)
        if span is None:
            continue
        checked += 1
        if not paper.within_factor(rel[layer], *span):
            shown = _g(span[0]) if span[0] == span[1] else f"{_g(span[0])}-{_g(span[1])}"
            bad.append(f"{layer} {_g(rel[layer], 2)} (ref {shown})")
    if not checked:
        return "", "nothing to compare"
    notes = []
    if batch_size > 0 and batch_size != ref.batch_size:
        notes.append(f"reference used B={ref.batch_size}")
    if kind == "p" and _isnum(desc["dt"]) and desc["dt"] != 1.0:
        notes.append("reference used dt=1")
    if not at_table3:
        notes.append("settings differ from Table 3")
    detail = "; ".join(bad + notes)
    return ("out of range" if bad else "in range"), detail


def summarize_gdu(df: pd.DataFrame) -> pd.DataFrame:
    """One row per GDU experiment × flavour × nudging × β × algorithm compared with BPTT (the
    table's ``<name>_vs_bptt`` rows, ``algorithm`` = the name): settings, per-layer means over trials
    (``relmse_<layer>``, ``sign_<layer>``, ``cosine_<layer>``), their ranges, the first-phase
    convergence (mean and worst trial), ``relmse_neurons`` (mean over the neuron layers),
    ``drift_ratio`` (worst trial) and ``converged`` (True, False or None when unknown) by the rule
    of :mod:`epbench.convergence`, and the check of official-code rows against the official
    code's magnitudes (``sanity``, ``sanity_detail``)."""
    gdu = df[df["task"] == "gdu"] if "task" in df else df.iloc[0:0]
    compared = algorithms_in(gdu, comparisons=True)
    records = []
    for (exp, _, symmetric, beta), rows in _groups(gdu, figs.VARIANT):
        for algorithm in compared:
            pair = rows[rows["algorithm"] == comparison_name(algorithm)]
            if not pair.empty:
                records.append(_gdu_record(exp, algorithm, bool(symmetric), float(beta), rows, pair))
    return pd.DataFrame.from_records(records)


def _gdu_record(exp: str, algorithm: str, symmetric: bool, beta: float, rows: pd.DataFrame,
                pair: pd.DataFrame) -> dict:
    """One row of :func:`summarize_gdu`: ``rows`` of one variant, ``pair`` its comparison rows
    of ``algorithm``."""
    first = rows.iloc[0]
    preset = paper.preset_key(first.to_dict())
    desc = model_settings(first)
    conv = rows[rows["metric"] == "convergence"]["value"]
    rel = _layer_means(pair[pair["metric"] == "relmse"])
    sign = _layer_means(pair[pair["metric"] == "sign_agreement"])
    zero = _layer_means(pair[pair["metric"] == "sign_both_zero"])
    cos = _layer_means(pair[pair["metric"] == "cosine"])
    rec = {
        "experiment": exp, "algorithm": algorithm, "preset": preset or "", "flavor": first["flavor"],
        "model": first["model"],
        "model_desc": first["model_desc"], "activation": desc["activation"], "dt": desc["dt"],
        "T": int(first["T"]), "K": int(first["K"]), "beta": float(beta), "symmetric": bool(symmetric),
        "dtype": first["dtype"], "dataset": first["dataset"], "batch_size": int(first["batch_size"]),
        "n_trials": int(rows["trial"].nunique()),
        "neuron_layers": ",".join(l for l in rel if _is_neuron(l)),
        "weight_layers": ",".join(l for l in rel if not _is_neuron(l)),
        "convergence": float(conv.mean()) if len(conv) else float("nan"),
        "convergence_max": float(conv.max()) if len(conv) else float("nan"),
        "sign_min": min(sign.values()) if sign else float("nan"),
        "sign_max": max(sign.values()) if sign else float("nan"),
        "both_zero_max": max(zero.values()) if zero else float("nan"),
        "cosine_min": min(cos.values()) if cos else float("nan"),
        "cosine_max": max(cos.values()) if cos else float("nan"),
    }
    neurons = [v for k, v in rel.items() if _is_neuron(k)]
    rec["relmse_neurons"] = float(np.mean(neurons)) if neurons else float("nan")
    rec["drift_ratio"] = drift_ratio(rec["convergence_max"], first["model"], desc["dt"], float(beta),
                                     bool(symmetric))
    rec["converged"] = converged_for(algorithm, rec["drift_ratio"], rec["relmse_neurons"], rec["convergence_max"],
                                     rec["dtype"])
    rec.update({f"relmse_{k}": v for k, v in rel.items()})
    rec.update({f"sign_{k}": v for k, v in sign.items()})
    rec.update({f"cosine_{k}": v for k, v in cos.items()})
    ref3 = paper_table3(preset)
    if ref3 is None:
        rec["table3"] = ""
    else:
        diffs = [f"{n} {v:g} (paper {r:g})" for n, v, r in
                 (("T", rec["T"], ref3[0]), ("K", rec["K"], ref3[1]), ("β", abs(rec["beta"]), ref3[2])) if v != r]
        if rec["symmetric"]:
            diffs.append("symmetric ±β (paper one-sided)")
        rec["table3"] = "= Table 3" if not diffs else "differs: " + ", ".join(diffs)
    if first["flavor"] == "official-code" and algorithm != PAPER_ALGORITHM:
        rec["sanity"], rec["sanity_detail"] = "", f"no official-code reference for {algorithm_label(algorithm)}"
    elif first["flavor"] == "official-code":
        rec["sanity"], rec["sanity_detail"] = _sanity(preset, rel, rec["batch_size"], desc, first["model"],
                                                 rec["table3"] == "= Table 3")
    else:
        rec["sanity"], rec["sanity_detail"] = "", ""
    return rec


def paper_table3(preset: str | None) -> tuple[int, int, float] | None:
    """(T, K, β) of Table 3 (published) for a preset row."""
    from epbench.presets import TABLE3

    if preset not in TABLE3:
        return None
    _, T, K, beta = TABLE3[preset]
    return T, K, beta


def _layers_text(row: pd.Series, prefix: str, layers: str, digits: int = 2) -> str:
    names = [l for l in str(layers).split(",") if l]
    return ", ".join(f"{l} {_g(row.get(f'{prefix}_{l}'), digits)}" for l in names) or "—"


def _range_text(lo, hi, fmt) -> str:
    if not _isnum(lo):
        return "—"
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def _flagged(value) -> bool:
    """A ``converged`` value that says not converged (False or numpy's False; None is unknown)."""
    return value is not None and not pd.isna(value) and not bool(value)


def _converged_text(r: pd.Series) -> str:
    """'yes (r 5.6e-05)', '**no** (r 1.2e+02)' or '—' (see :mod:`epbench.convergence`)."""
    if r["converged"] is None or not _isnum(r["drift_ratio"]):
        return "—"
    return f"{'yes' if r['converged'] else '**no**'} (r {_g(r['drift_ratio'], 2)})"


def _relmse_cell(r: pd.Series, layers: str) -> str:
    text = _layers_text(r, "relmse", layers)
    return f"**not converged** ({text})" if _flagged(r["converged"]) else text


def _gdu_markdown(summary: pd.DataFrame) -> str:
    header = ["experiment", "algorithm", "flavour", "activation", "T", "K", "β", "ε / dt", "B", "n", "RelMSE neurons",
              "RelMSE weights", "same sign %", "cosine", "‖s_T − s_{T−1}‖", "converged (drift ratio r)",
              "Table 3 settings", "vs official-code magnitudes (×3)"]
    rows = []
    for _, r in summary.iterrows():
        sign = _range_text(r["sign_min"], r["sign_max"], lambda v: f"{v:.1f}")
        if _isnum(r["both_zero_max"]) and r["both_zero_max"] > 0:
            sign += f" (both 0 ≤ {r['both_zero_max']:.1f})"
        if r["sanity"]:
            check = r["sanity"] + (f": {r['sanity_detail']}" if r["sanity_detail"] else "")
        else:
            check = r["sanity_detail"] or "—"
        beta = f"±{abs(r['beta']):g}" if r["symmetric"] else f"{r['beta']:g}"
        rows.append([r["experiment"], algorithm_label(r["algorithm"]), r["flavor"], r["activation"], r["T"], r["K"],
                     beta, _g(r["dt"]),
                     r["batch_size"], r["n_trials"], _relmse_cell(r, r["neuron_layers"]),
                     _relmse_cell(r, r["weight_layers"]), sign,
                     _range_text(r["cosine_min"], r["cosine_max"], lambda v: f"{v:.4f}"),
                     _g(r["convergence_max"], 2), _converged_text(r), r["table3"] or "—", check])
    return _table(header, rows)


def _variant_name(r: pd.Series) -> str:
    beta = f"±β = {abs(r['beta']):g}" if r["symmetric"] else f"β = {r['beta']:g}"
    return f"{r['experiment']} ({algorithm_label(r['algorithm'])}, {r['flavor']}, {beta})"


def _gdu_section(summary: pd.DataFrame) -> list[str]:
    """The GDU section's heading, text, table and, in bold, every row whose first phase has not
    converged (:mod:`epbench.convergence`)."""
    names = ", ".join(algorithm_label(a) for a in dict.fromkeys(summary["algorithm"])) if len(summary) else ""
    out = [f"## GDU property: per-step processes vs BPTT gradients (Table 3): {names}", "",
           "RelMSE of each algorithm's processes against BPTT's with the sign they estimate it with "
           "(ΔEP against −∇BPTT for EP) per layer (appendix eq. 67; mean over trials; 0 means identical "
           "processes), % of parameters whose cumulative update and signed BPTT gradient share a sign, cosine "
           "similarity (range over layers), and the first phase's leftover step ‖s_T − s_{T−1}‖_∞ (worst trial). "
           "Theorem 1 compares the processes from a steady state: a row counts as converged when the drift "
           "ratio r = ‖s_T − s_{T−1}‖_∞ / ep_scale(β) (the most the leftover drift adds to an entry of ΔEP_s; "
           "ep_scale = εβ for EB and toy, dt·β for P (dt = 1 without a leak); with symmetric nudging the drift cancels between +β and −β "
           f"and r = ‖s_T − s_{{T−1}}‖_∞ / (ep_scale / β)) is at most {DRIFT_SHARE:g} × its neuron-mean RelMSE; "
           "otherwise its RelMSE measures the drift, not the GDU property. An algorithm without β (RBP) "
           "assumes s_T is a fixed point: its rows count as converged when ‖s_T − s_{T−1}‖_∞ is within "
           f"{FIXED_POINT_ULPS} units of the dtype's rounding. Official-code rows are checked "
           "against the magnitudes the official code gives at Table 3 settings (in range = within a factor of "
           f"{paper.SANITY_FACTOR:g}).", "", _gdu_markdown(summary), ""]
    bad = summary[summary["converged"].apply(_flagged)] if not summary.empty else summary
    for _, r in bad.iterrows():
        if uses_beta(r["algorithm"]):
            rule = f"drift ratio r = {_g(r['drift_ratio'], 2)} > {DRIFT_SHARE:g} × RelMSE {_g(r['relmse_neurons'], 2)}"
        else:
            rule = f"more than {FIXED_POINT_ULPS} units of {r['dtype']} rounding"
        out += [f"**Not converged: {_variant_name(r)}, ‖s_T − s_{{T−1}}‖_∞ = {_g(r['convergence_max'], 2)} after "
                f"T = {r['T']} steps, {rule}. Its RelMSE values do not measure the GDU property.**", ""]
    return out


#: the official code's departures from the appendix (the ``flavor`` switches of epbench.spec.ModelSpec)
_FLAVOUR_WHY = {
    "eb": ("the official code omits σ'(s⁰) on the EB output layer, so its Jacobian is not symmetric "
           "(docs/equations.md, EB); it also adds biases and uses PyTorch's default initialisation "
           "instead of the appendix's Glorot"),
    "toy": "the official code adds biases and uses PyTorch's default initialisation instead of Glorot",
    "p": ("the official code adds biases, uses PyTorch's default initialisation instead of Glorot and, "
          "unless dt = 1 is passed, a leak dt = 0.2 in the P dynamics (appendix C.4 has none)"),
    "pconv": "the official code adds biases and uses PyTorch's default initialisation instead of Glorot",
}


def flavour_comparison(summary: pd.DataFrame) -> list[str]:
    """One sentence per preset run in both flavours (same β and nudging where possible)."""
    out = []
    if summary.empty:
        return out
    several = summary["algorithm"].nunique() > 1
    for (preset, algorithm), rows in summary[summary["preset"] != ""].groupby(["preset", "algorithm"], sort=False):
        one = rows[~rows["symmetric"]] if (~rows["symmetric"]).any() else rows
        pap, off = one[one["flavor"] == "paper"], one[one["flavor"] == "official-code"]
        if pap.empty or off.empty:
            continue
        common = sorted(set(pap["beta"]) & set(off["beta"]))
        ref3 = paper_table3(preset)
        if common:
            beta = ref3[2] if ref3 and ref3[2] in common else common[0]
            p, o = pap[pap["beta"] == beta].iloc[0], off[off["beta"] == beta].iloc[0]
        else:
            p, o = pap.iloc[0], off.iloc[0]
        parts = []
        for layers in (p["neuron_layers"], p["weight_layers"]):
            for layer in [l for l in str(layers).split(",") if l and not l.startswith("b")]:
                a, b = p.get(f"relmse_{layer}"), o.get(f"relmse_{layer}")
                if _isnum(a) and _isnum(b):
                    ratio = f" (×{b / a:.2g})" if a > 0 else ""
                    parts.append(f"{layer} {_g(a, 2)} paper vs {_g(b, 2)} official code{ratio}")
        if not parts:
            continue
        betas = (f"β = {p['beta']:g}" if p["beta"] == o["beta"]
                 else f"β = {p['beta']:g} (paper), {o['beta']:g} (official code)")
        dts = ""
        if _isnum(p["dt"]) and _isnum(o["dt"]) and p["dt"] != o["dt"]:
            dts = f" Here dt = {p['dt']:g} (paper) and {o['dt']:g} (official code)."
        why = _FLAVOUR_WHY.get(str(p["model"]), "")
        stale = [name for name, r in (("paper", p), ("official-code", o)) if _flagged(r["converged"])]
        warn = (f" **Not converged ({' and '.join(stale)} flavour): these values do not measure the GDU "
                f"property.**" if stale else "")
        who = f", {algorithm_label(algorithm)}" if several else ""
        out.append(f"**{paper.DISPLAY.get(preset, preset)}** ({betas}{who}), RelMSE: " + "; ".join(parts) + "."
                   + warn + (f" The flavours differ in that {why}." if why else "") + dts)
    return out


# ----- Theorem 1 -----------------------------------------------------------------------------------
def _with_family(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``df`` with a ``family`` column: '<preset or experiment> T=.. K=.. <dtype>'."""
    out = df.copy()
    records = out[["experiment", "model", "model_desc"]].to_dict("records")
    base = [paper.preset_key(r) or r["experiment"] for r in records]
    out["family"] = [f"{b} T={T} K={K} {d}" for b, T, K, d in zip(base, out["T"], out["K"], out["dtype"])]
    return out


def summarize_theorem1(df: pd.DataFrame, layer: str | None = None) -> pd.DataFrame:
    """β sweeps: per family (preset or experiment, T, K, dtype; and the compared algorithm, named in
    ``family`` when the table compares several) with several β, RelMSE (mean over
    neuron layers, or ``layer``) per (flavor, symmetric, β), the fitted log-log slope of each line
    (over all its points), what Theorem 1 predicts for it (``prediction``), and per point the worst
    first-phase ``convergence``, its ``drift_ratio`` and ``converged`` (:mod:`epbench.convergence`);
    ``base``: the family without the algorithm's name."""
    cols = ["family", "algorithm", "flavor", "symmetric", "beta", "relmse", "n", "slope", "prediction",
            "convergence", "drift_ratio", "converged"]
    gdu = figs.comparison_rows(df[(df["task"] == "gdu") & (df["metric"] == "relmse")])
    if gdu.empty:
        return pd.DataFrame(columns=cols)
    compared = algorithms_in(gdu, comparisons=True)
    conv = _with_family(df[(df["task"] == "gdu") & (df["metric"] == "convergence")])
    conv = conv.assign(beta=conv["beta"].abs())
    frames = []
    rows_of = _with_family(gdu).assign(compared=lambda d: d["algorithm"].map(compared_algorithm))
    for (family, algorithm), rows in _groups(rows_of, ["family", "compared"]):
        lines = figs.theorem1_lines(rows, layer, algorithm=algorithm)
        if lines.empty or lines.groupby(["flavor", "symmetric"])["beta"].nunique().max() < 2:
            continue
        slopes = {key: figs.fit_slope(g["beta"], g["relmse"]) for key, g in lines.groupby(["flavor", "symmetric"])}
        model = {f: g.iloc[0] for f, g in rows.groupby("flavor")}
        points = []
        for f, s, b, value in zip(lines["flavor"], lines["symmetric"], lines["beta"], lines["relmse"]):
            first = model[f]
            c = conv[(conv["family"] == family) & (conv["flavor"] == f) & (conv["symmetric"] == s)
                     & (conv["beta"] == b)]["value"]
            worst = float(c.max()) if len(c) else float("nan")
            ratio = drift_ratio(worst, first["model"], model_settings(first)["dt"], b, bool(s))
            points.append({"slope": slopes[(f, s)], "prediction": theorem1_prediction(first["model"], f, bool(s)),
                           "convergence": worst, "drift_ratio": ratio,
                           "converged": converged_for(algorithm, ratio, value, worst, first["dtype"])})
        name = f"{family} {algorithm_label(algorithm)}" if len(compared) > 1 else family
        lines = lines.reset_index(drop=True).join(pd.DataFrame(points)).assign(family=name, base=family,
                                                                                algorithm=algorithm)
        frames.append(lines)
    return pd.concat(frames, ignore_index=True)[cols + ["base"]] if frames else pd.DataFrame(columns=cols + ["base"])


def _theorem1_markdown(t1: pd.DataFrame, family: str) -> str:
    rows = t1[t1["family"] == family]
    keys = list(dict.fromkeys(zip(rows["flavor"], rows["symmetric"])))
    header = ["β"] + [figs.line_label(f, bool(s)) for f, s in keys]
    body = []
    for beta in sorted(rows["beta"].unique(), reverse=True):
        line = [f"{beta:g}"]
        for f, s in keys:
            v = rows[(rows["flavor"] == f) & (rows["symmetric"] == s) & (rows["beta"] == beta)]
            if not len(v):
                line.append("—")
            elif _flagged(v["converged"].iloc[0]):
                line.append(f"**{_g(v['relmse'].iloc[0])} not converged (r {_g(v['drift_ratio'].iloc[0], 2)})**")
            else:
                line.append(_g(v["relmse"].iloc[0]))
        body.append(line)
    slopes, expected = ["fitted slope (log-log)"], ["Theorem 1 predicts"]
    for f, s in keys:
        line = rows[(rows["flavor"] == f) & (rows["symmetric"] == s)]
        stale = int(line["converged"].apply(_flagged).sum())
        slope = _f(line["slope"].iloc[0])
        slopes.append(f"**{slope} ({stale} point(s) not converged)**" if stale else slope)
        expected.append(line["prediction"].iloc[0])
    body += [slopes, expected]
    return _table(header, body)


def _theorem1_intro(t1: pd.DataFrame) -> list[str]:
    """The Theorem 1 section's text: what each line is expected to show, the convergence rule, and
    in bold every point whose first phase has not converged."""
    out = ["## Theorem 1: RelMSE against β", "",
           "RelMSE averaged over the neuron layers, against β, one-sided (β) and symmetric (±β) nudging. "
           "Theorem 1 says ΔEP → −∇BPTT as β → 0 when the dynamics derive from a primitive function, "
           "F = ∂Φ/∂s: the toy model (σ' on both layers in either flavour) and the EB models of the paper "
           "flavour (σ'(s⁰) on the output). There RelMSE falls like β with one-sided nudging and like β² with "
           "symmetric nudging, until float64 rounding (about 1e-16 / ep_scale, relative) stops it. The "
           "official-code EB (no σ'(s⁰), so F ≠ ∂Φ/∂s) and the P models (F = ∂Φ/∂s only when the activation "
           "is ignored, appendix eq. 73) level off at a floor instead. The row \"Theorem 1 predicts\" of each "
           "table says which applies. A point counts only if its first phase has converged for its β: "
           f"drift ratio r = ‖s_T − s_{{T−1}}‖_∞ / ep_scale(β) ≤ {DRIFT_SHARE:g} × its RelMSE (the one-sided "
           "EP process divides the first phase's leftover drift by ep_scale, which shrinks with β; with symmetric "
           "nudging the drift cancels between +β and −β, and r = ‖s_T − s_{T−1}‖_∞ / (ep_scale / β)).", ""]
    bad = t1[t1["converged"].apply(_flagged)]
    for _, r in bad.iterrows():
        nudge = "±β" if r["symmetric"] else "β"
        out += [f"**Not converged: {r['family']}, {r['flavor']}, {nudge} = {r['beta']:g}: ‖s_T − s_{{T−1}}‖_∞ = "
                f"{_g(r['convergence'], 2)}, r = {_g(r['drift_ratio'], 2)} > {DRIFT_SHARE:g} × RelMSE "
                f"{_g(r['relmse'], 2)}.**", ""]
    return out


# ----- training (Tables 4 and 1) -------------------------------------------------------------------
def _final_per_trial(rows: pd.DataFrame) -> pd.Series:
    rows = rows[rows["epoch"] >= 0] if (rows["epoch"] >= 0).any() else rows
    return rows.sort_values("epoch").groupby("trial")["value"].last()


def summarize_training(df: pd.DataFrame) -> pd.DataFrame:
    """One row per training experiment (variant): settings, final (last epoch) test error mean ± std
    (sample std, n−1) and final train error mean per algorithm over the trials run, the
    published Table 1 values (``paper_*``, for the algorithms Table 1 has) and the differences
    run − published (``diff_*``). The algorithms are those of the table's training rows
    (``algorithms``, in order of appearance)."""
    train = df[df["task"] == "train"] if "task" in df else df.iloc[0:0]
    algos = algorithms_in(train)
    records = []
    for (exp, *_), rows in _groups(train, figs.VARIANT):
        first = rows.iloc[0]
        preset = paper.preset_key(first.to_dict())
        desc = model_settings(first)
        rec = {"experiment": exp, "preset": preset or "", "flavor": first["flavor"], "model": first["model"],
               "model_desc": first["model_desc"], "activation": desc["activation"], "dt": desc["dt"],
               "T": int(first["T"]), "K": int(first["K"]), "beta": float(first["beta"]),
               "symmetric": bool(first["symmetric"]), "epochs": int(first["epochs"]),
               "batch_size": int(first["batch_size"]), "dataset": first["dataset"], "dtype": first["dtype"]}
        lr_col = next((c for c in LR_COLUMNS if c in rows.columns), None)
        rec["lrs"] = str(first[lr_col]) if lr_col else ""
        rec["n_classes"] = desc["n_classes"]
        rec["algorithms"] = algos
        tests = rows[rows["metric"] == "test_error"]
        rec["epochs_run"] = int(tests.loc[tests["epoch"] >= 0, "epoch"].nunique()) if len(tests) else 0
        for algo in algos:
            test = _final_per_trial(tests[tests["algorithm"] == algo])
            tr = _final_per_trial(rows[(rows["metric"] == "train_error") & (rows["algorithm"] == algo)])
            flags = _trial_flags(rows[rows["algorithm"] == algo])
            etime = rows[(rows["metric"] == "epoch_time_s") & (rows["algorithm"] == algo)]["value"]
            rec[f"n_{algo}"] = int(len(test))
            rec[f"{algo}_test_mean"] = float(test.mean()) if len(test) else float("nan")
            rec[f"{algo}_test_std"] = float(test.std(ddof=1)) if len(test) > 1 else float("nan")
            rec[f"{algo}_train_mean"] = float(tr.mean()) if len(tr) else float("nan")
            rec[f"{algo}_diverged"] = sum(1 for f in flags.values() if f == "diverged")
            rec[f"{algo}_flags"] = {f: sum(1 for v in flags.values() if v == f) for f in dict.fromkeys(flags.values())
                                    if f != "ok"}
            rec[f"{algo}_epoch_time_s"] = float(etime.mean()) if len(etime) else float("nan")
        pub = paper.TABLE1.get(preset or "")
        for algo in algos:
            for what in ("test", "test_std", "train"):
                rec[f"paper_{algo}_{what}"] = getattr(pub, f"{algo}_{what}", float("nan")) if pub else float("nan")
            rec[f"diff_{algo}_test"] = rec[f"{algo}_test_mean"] - rec[f"paper_{algo}_test"]
        rec["paper_epochs"] = pub.epochs if pub else -1
        reasons = []
        if pub:
            if str(rec["dataset"]).lower() != "mnist":
                reasons.append(f"dataset {rec['dataset']}")
            if rec["epochs_run"] < pub.epochs:
                reasons.append(f"{rec['epochs_run']} of {pub.epochs} epochs")
            if (rec["T"], rec["K"]) != (pub.T, pub.K):
                reasons.append(f"T={rec['T']}, K={rec['K']} (paper {pub.T}, {pub.K})")
            for algo in published_algorithms():
                if rec.get(f"n_{algo}", 0) == 0:
                    reasons.append(f"no {algorithm_label(algo)} run")
            ran = [rec[f"n_{a}"] for a in published_algorithms() if rec.get(f"n_{a}", 0)]
            if ran and min(ran) < pub.trials:
                reasons.append(f"{min(ran)} of {pub.trials} trials")
        rec["not_comparable"] = "; ".join(reasons)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def published_algorithms() -> list[str]:
    """The algorithms of Table 1 (those :class:`epbench.paper.PublishedTraining` has values of)."""
    import dataclasses

    return [f.name[:-len("_test")] for f in dataclasses.fields(paper.PublishedTraining) if f.name.endswith("_test")]


def _trial_flags(rows: pd.DataFrame) -> dict:
    """trial -> verdict (``status`` column: ok, diverged, exploded, chance) of one algorithm's
    training rows. Tables written before the column existed: diverged from the ``diverged``
    metric, else ok."""
    flags = {}
    for trial, part in rows.groupby("trial", sort=True):
        recorded = [v for v in part["status"].astype(str) if v not in ("", "nan")] if "status" in part else []
        if recorded:
            flags[trial] = recorded[-1]
        else:
            div = part[part["metric"] == "diverged"]["value"]
            flags[trial] = "diverged" if len(div) and div.max() > 0 else "ok"
    return flags


def _table4_diff(rec: pd.Series) -> str:
    """Which settings of a training experiment differ from its Table 4 row: activation, T, K, β,
    epochs, batch size (20 throughout the paper), the learning rates (input side first) and ε
    of EB models."""
    from epbench.presets import TABLE4

    if rec["preset"] not in TABLE4:
        return "no Table 4 row"
    kw, T, K, beta, epochs, lrs = TABLE4[rec["preset"]]
    diffs = []
    for name, ours, ref in (("activation", rec["activation"], kw.get("activation")), ("T", rec["T"], T),
                            ("K", rec["K"], K), ("β", rec["beta"], beta), ("epochs", rec["epochs"], epochs),
                            ("batch", rec["batch_size"], 20)):
        if ours != ref:
            both = _isnum(ours) and _isnum(ref)
            diffs.append(f"{name} {ours:g} (paper {ref:g})" if both else f"{name} {ours} (paper {ref})")
    published = "-".join(f"{v:g}" for v in lrs)
    if rec["lrs"] and str(rec["lrs"]) != published:
        diffs.append(f"learning rates {rec['lrs']} (paper {published})")
    eps = kw.get("dt")
    if kw.get("kind") == "eb" and _isnum(rec["dt"]) and eps != rec["dt"]:
        diffs.append(f"ε {rec['dt']:g} (paper {eps:g})")
    return "= Table 4" if not diffs else "differs: " + ", ".join(diffs)


def _training_markdown(summary: pd.DataFrame) -> tuple[str, str]:
    from epbench.presets import TABLE4

    settings = []
    for _, r in summary.iterrows():
        lrs = r["lrs"] or "—"
        pub_lrs = "-".join(f"{v:g}" for v in TABLE4[r["preset"]][5]) if r["preset"] in TABLE4 else "—"
        settings.append([r["experiment"], r["flavor"], r["activation"], r["T"], r["K"], f"{r['beta']:g}",
                         _g(r["dt"]), r["epochs"], r["batch_size"], lrs, pub_lrs, r["dataset"], r["dtype"],
                         _table4_diff(r)])
    t4 = _table(["experiment", "flavour", "activation", "T", "K", "β", "ε / dt", "epochs", "batch",
                 "learning rates (run)", "learning rates (Table 4, published)", "dataset", "dtype", "vs Table 4"],
                settings)
    algos = _summary_algorithms(summary)
    published = [a for a in algos if a in published_algorithms()]
    results = []
    for _, r in summary.iterrows():
        div = ", ".join(f"**{algorithm_label(a)}: {n} {flag}**" for a in algos
                        for flag, n in (r.get(f"{a}_flags") or {}).items())
        row = [r["experiment"], r["epochs_run"]]
        for a in algos:
            row += [f"{_pm(r[f'{a}_test_mean'], r[f'{a}_test_std'])} (n={r[f'n_{a}']})", _f(r[f"{a}_train_mean"])]
        for a in published:
            row += [_pm(r[f"paper_{a}_test"], r[f"paper_{a}_test_std"]), _f(r[f"paper_{a}_train"])]
        row += [f"{r[f'diff_{a}_test']:+.2f}" if _isnum(r[f"diff_{a}_test"]) else "—" for a in published]
        row += [div or "—", r["not_comparable"] or ("—" if r["preset"] in paper.TABLE1 else "no Table 1 row")]
        results.append(row)
    header = ["experiment", "epochs run"]
    for a in algos:
        header += [f"{algorithm_label(a)} test %", f"{algorithm_label(a)} train %"]
    for a in published:
        header += [f"published {algorithm_label(a)} test %", f"published {algorithm_label(a)} train %"]
    header += [f"Δ {algorithm_label(a)} test" for a in published] + ["flagged trials", "not comparable because"]
    t1 = _table(header, results)
    legend = "\n\n".join(part for part in (_flags_legend(summary), _stuck_paper_flavour(summary)) if part)
    return t4, t1 + ("\n\n" + legend if legend else "")


def _summary_algorithms(summary: pd.DataFrame) -> list[str]:
    """The algorithms of a :func:`summarize_training` table."""
    return list(summary["algorithms"].iloc[0]) if len(summary) and "algorithms" in summary else []


def _flags_legend(summary: pd.DataFrame) -> str:
    """The rule behind each flag that appears in the table (:func:`epbench.training.status_text`), in bold."""
    from epbench.training import status_text

    seen = {}
    for _, r in summary.iterrows():
        for algo in _summary_algorithms(summary):
            for flag in r.get(f"{algo}_flags") or {}:
                seen.setdefault((flag, r["n_classes"]), None)
    if not seen:
        return ""
    return ("**Flagged trials** (verdict per trial and algorithm after its last epoch; their errors are "
            "included in the means above): " + "; ".join(f"**{flag}**: {status_text(flag, n)}" for flag, n in seen)
            + ".")


def _stuck_paper_flavour(summary: pd.DataFrame) -> str:
    """Why BPTT sits at chance on paper-flavour rows where EP learns (BPTT trials flagged
    ``chance``, no EP trial flagged): from Glorot-initialised weights BPTT's first steps put the
    outputs where its gradient vanishes, while EP's state differences still move (docs/flavours.md,
    tests/test_training_mechanisms.py). Empty when no row is in that case."""
    rows = [r["experiment"] for _, r in summary.iterrows() if r["flavor"] == "paper"
            and (r.get(f"{REFERENCE}_flags") or {}).get("chance")
            and f"n_{PAPER_ALGORITHM}" in r and not (r.get(f"{PAPER_ALGORITHM}_flags") or {}).get("chance")]
    if not rows:
        return ""
    return (f"**BPTT at chance in the paper flavour ({', '.join(rows)}), EP learning.** This is the paper "
            "flavour's Glorot initialisation, not a failure of BPTT: from those weights BPTT's first steps drive "
            "the outputs where its gradient vanishes (EB: onto the clamp bound 0, where ∂L/∂θ is exactly 0; P: "
            "the correct class's unit to ρ'(pre⁰) ≈ 0), while EP's update, a difference of states that the "
            "nudge β(y − s⁰) still moves, does not vanish. From the official code's initial weights "
            "U(±1/√fan_in), 1.7-2.4 times narrower, BPTT learns these rows: rerun with "
            "`--set model.flavor=official-code` (the training suites' default). Measurements: docs/flavours.md.")


# ----- timing ------------------------------------------------------------------------------------
def summarize_timing(df: pd.DataFrame) -> pd.DataFrame:
    """Per experiment × trial: wall time (summed over the variants of a sweep), sums of
    compile_s / run_s over distinct measurements (rows repeating one measurement's timings count
    once), and ``<algorithm>_epoch_time_s`` for each algorithm of the training rows."""
    algos = algorithms_in(df[df["task"] == "train"]) if "task" in df else []
    cols = ["experiment", "trial", "task", "wall_time_s", "compile_s", "run_s"] + [f"{a}_epoch_time_s" for a in algos]
    records = []
    for (exp, trial), rows in _groups(df, ["experiment", "trial"]):
        # a GDU measurement gives rows of every algorithm at once; training measures each apart
        rows = rows.assign(measured=np.where(rows["task"] == "train", rows["algorithm"], ""))
        meas = rows.drop_duplicates(figs.VARIANT[1:] + ["measured", "epoch", "compile_s", "run_s"])
        rec = {"experiment": exp, "trial": int(trial), "task": rows["task"].iloc[0],
               "wall_time_s": float(rows.groupby(figs.VARIANT[1:])["wall_time_s"].max().sum()),
               "compile_s": float(meas["compile_s"].sum(min_count=1)),
               "run_s": float(meas["run_s"].sum(min_count=1))}
        for algo in algos:
            et = rows[(rows["metric"] == "epoch_time_s") & (rows["algorithm"] == algo)]["value"]
            rec[f"{algo}_epoch_time_s"] = float(et.mean()) if len(et) else float("nan")
        records.append(rec)
    return pd.DataFrame.from_records(records, columns=cols)


def _timing_markdown(timing: pd.DataFrame) -> str:
    epoch_cols = [c for c in timing.columns if c.endswith("_epoch_time_s")]
    rows = [[r["experiment"], r["trial"], r["task"], _f(r["wall_time_s"], 1), _f(r["compile_s"], 2),
             _f(r["run_s"], 2)] + [_f(r[c], 2) for c in epoch_cols]
            for _, r in timing.iterrows()]
    total = {c: timing[c].sum(min_count=1) for c in ("wall_time_s", "compile_s", "run_s")}
    rows.append(["**total**", "", "", _f(total["wall_time_s"], 1), _f(total["compile_s"], 2),
                 _f(total["run_s"], 2)] + [""] * len(epoch_cols))
    return _table(["experiment", "trial", "task", "wall time (s)", "Σ compile_s", "Σ run_s"]
                  + [f"{algorithm_label(c[:-len('_epoch_time_s')])} s/epoch (mean)" for c in epoch_cols], rows)


# ----- the report --------------------------------------------------------------------------------
def _one_beta(gdu: pd.DataFrame, one_sided: bool = False) -> pd.DataFrame:
    """Rows of each experiment × flavour × nudging at one β: Table 3's when it was run, else the
    largest |β|; with ``one_sided``, symmetric nudging is dropped where one-sided was run too."""
    keep = []
    for _, rows in _groups(gdu, ["experiment", "flavor"]):
        if one_sided and (~rows["symmetric"]).any():
            rows = rows[~rows["symmetric"]]
        for _, part in _groups(rows, ["symmetric"]):
            keep.append(_at_one_beta(part))
    return pd.concat(keep) if keep else gdu


def _at_one_beta(rows: pd.DataFrame) -> pd.DataFrame:
    betas = list(dict.fromkeys(rows["beta"]))
    ref3 = paper_table3(paper.preset_key(rows.iloc[0].to_dict()))
    beta = ref3[2] if ref3 and ref3[2] in betas else max(betas, key=abs)
    return rows[rows["beta"] == beta]


def _image(title: str, stem: str) -> str:
    return f"![{title}]({FIGURES}/{stem}.png)"


def _distinct(df: pd.DataFrame, column: str) -> str:
    if column not in df or df.empty:
        return ""
    return ", ".join(str(v) for v in dict.fromkeys(df[column].astype(str)) if v not in ("", "nan"))


def _header(df: pd.DataFrame, meta: dict) -> list[str]:
    def pick(key, column=None):
        value = meta.get(key)
        return str(value) if value not in (None, "") else _distinct(df, column or key) or "unknown"

    suite = pick("suite")
    commit = pick("git_commit")
    dirty = meta.get("git_dirty", bool(df["git_dirty"].any()) if "git_dirty" in df and len(df) else False)
    host = meta.get("host") or {}
    host_text = ", ".join(f"{k} {v}" for k, v in host.items()) if isinstance(host, dict) else str(host)
    info = [
        ("suite", f"{suite}" + (f" (`{meta['suite_path']}`)" if meta.get("suite_path") else "")
         + (f", hash {meta['suite_hash']}" if meta.get("suite_hash") else "")),
        ("backend", pick("backend")), ("device", pick("device")),
        ("framework", f"{pick('framework')} {pick('framework_version')}"),
        ("dtype", _distinct(df, "dtype") or "unknown"), ("epbench version", pick("epbench_version")),
        ("git commit", f"{commit} ({'dirty: uncommitted changes' if dirty else 'clean'})"),
        ("started", pick("started", "start_time")), ("finished", str(meta.get("finished", "unknown"))),
        ("status", str(meta.get("status", "unknown"))
         + (f" (signal {meta['signal']})" if meta.get("signal") else "")
         + (f": {meta['error']}" if meta.get("error") else "")
         + (f": {meta['status_detail']}" if meta.get("status_detail") else "")),
        ("quick", "yes" if meta.get("quick") else "no"),
        ("overrides", ", ".join(f"`{o}`" for o in meta.get("overrides") or []) or "none"),
        ("host", (host_text or "unknown") + (f"; {meta['hostname']}, pid {meta['pid']}" if meta.get("pid") else "")),
        ("table", f"{len(df)} rows, {df['experiment'].nunique() if len(df) else 0} experiments"),
    ]
    if meta.get("cells"):
        info.append(("cells", cells_text(meta)))
    lines = [f"# epbench report: {suite}", "",
             "Equilibrium Propagation vs BPTT (Ernoult et al., NeurIPS 2019). "
             "Published values below come from the paper (Tables 1, 3 and 4) or, where marked, from the "
             "official code; every other number comes from this run's table.",
             "", _table(["", ""], [[f"**{k}**", v] for k, v in info]), "", "Command:", "",
             "```", str(meta.get("command", "unknown")), "```", ""]
    return lines


def cells_text(meta: dict) -> str:
    """The run's cells (:mod:`epbench.cells`): how many finished, which failed, which were
    continued from a checkpoint, how many an earlier attempt had finished, and where they ran."""
    cells = meta["cells"]
    text = f"{cells.get('done', 0)} of {cells.get('total', 0)} done"
    if cells.get("failed"):
        text += "; failed: " + ", ".join(f"{label} ({error})" for label, error in cells["failed"].items())
    if cells.get("reused"):
        text += f"; {cells['reused']} finished by an earlier attempt (attempts: {meta.get('attempts', 1)})"
    if cells.get("resumed"):
        text += "; resumed from a checkpoint: " + ", ".join(f"{label} (after epoch {epoch})"
                                                            for label, epoch in cells["resumed"].items())
    if meta.get("executor"):
        text += f"; ran {meta['executor']}"
    return text


def render_report(run_dir: str | os.PathLike, svg: bool = False) -> Path:
    """Write ``report.md`` and ``figures/*.png`` (and ``*.svg`` with ``svg``) for a run directory;
    return the report's path. Figures of an earlier rendering that this one did not make (or an
    SVG not asked for this time) are removed, so what is there matches the report."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    try:
        df = read_table(run_dir)
    except FileNotFoundError:  # nothing ran (e.g. every experiment skipped)
        df = to_frame([])
    fig_dir = run_dir / FIGURES
    fig_dir.mkdir(exist_ok=True)
    made: set[str] = set()
    formats = ("png", "svg") if svg else ("png",)

    def figure(fn, data, stem, **kw) -> str:
        fn(data, fig_dir / stem, close=True, formats=formats, **kw)
        made.add(stem)
        return stem

    out = _header(df, meta)
    reductions = meta.get("reductions") or []
    if reductions:
        out += ["## Reduced run: not comparable with the paper", "",
                "> **Warning.** This run was reduced relative to the paper's settings. Its numbers are "
                "**not comparable** with the published values; they check that the harness works, "
                "not that the paper's results are reproduced.", ""]
        out += [f"- {r}" for r in reductions] + [""]
    status = meta.get("status")
    if status not in (None, "complete"):
        out += [f"> **Warning.** Run status: {status}. The table may hold only part of the suite.", ""]
    skipped = meta.get("skipped") or []
    if skipped:
        out += ["## Skipped experiments", "",
                _table(["experiment", "reason"],
                       [[s.get("experiment", "?"), s.get("reason", "")] for s in skipped]), ""]
    if df.empty:
        out += ["The results table is empty.", ""]

    gdu = df[df["task"] == "gdu"]
    if not gdu.empty:
        summary = summarize_gdu(df)
        out += _gdu_section(summary)
        sentences = flavour_comparison(summary)
        if sentences:
            out += ["### Paper flavour vs official-code flavour", ""] + [f"- {s}" for s in sentences] + [""]
        bars = figure(figs.relmse_bars, _one_beta(gdu), "relmse-bars")
        out += ["### Figures", "", "RelMSE per layer (one β per experiment: Table 3's where it was run):", "",
                _image("RelMSE per layer", bars), ""]
        processes = _one_beta(gdu[gdu["metric"] == "process"], one_sided=True)
        several = processes.groupby("experiment")["flavor"].nunique() if len(processes) else {}
        for (exp, flavor), rows in _groups(processes, ["experiment", "flavor"]):
            name = f"{exp} ({flavor})" if several[exp] > 1 else exp
            stem = figure(figs.gdu_processes, rows,
                          f"process-{_slug(exp)}" + (f"-{_slug(flavor)}" if several[exp] > 1 else ""))
            nudge = "±β" if rows["symmetric"].iloc[0] else "β"
            out += [f"GDU processes of {name} ({nudge} = {abs(rows['beta'].iloc[0]):g}):", "",
                    _image(f"GDU processes {name}", stem), ""]

        t1 = summarize_theorem1(df)
        if not t1.empty:
            out += _theorem1_intro(t1)
            families = _with_family(gdu)
            for family, base, algorithm in dict.fromkeys(zip(t1["family"], t1["base"], t1["algorithm"])):
                stem = figure(figs.theorem1_plot, families[families["family"] == base],
                              f"theorem1-{_slug(family)}", algorithm=algorithm)
                out += [f"### {family}", "", _theorem1_markdown(t1, family), "",
                        _image(f"Theorem 1 {family}", stem), ""]

    train = df[df["task"] == "train"]
    if not train.empty:
        summary = summarize_training(df)
        t4, t1md = _training_markdown(summary)
        datasets = ", ".join(dict.fromkeys(str(d) for d in train["dataset"]))
        out += [f"## Training on {datasets} (Tables 4 and 1)", "", "### Settings (Table 4)", "", t4, "",
                "### Final errors (Table 1)", "",
                "Test error at the last epoch: mean ± sample std (n−1) over the trials run (n); train error: "
                "mean at the last epoch. Published: Table 1 of the paper (5 trials). Δ = run − published.", "",
                t1md, "", _image("Training curves", figure(figs.training_curves, train, "training-curves")), ""]

    if not df.empty:
        out += ["## Timing", "", _timing_markdown(summarize_timing(df)), ""]

    if svg and made:
        out += [f"SVG copies of the figures: `{FIGURES}/*.svg`.", ""]
    for stale in fig_dir.glob("*"):
        if stale.suffix in (".png", ".svg") and (stale.stem not in made or stale.suffix[1:] not in formats):
            stale.unlink()
    path = run_dir / REPORT
    atomic_write_text(path, "\n".join(out))
    return path
