"""``epbench compare A B``: two runs side by side (two backends, two machines, two commits).

For every GDU experiment and layer: RelMSE, sign agreement and cosine in A and in B and their
difference; for every training experiment: the final test and train errors; for every
experiment: the timing columns (compile seconds apart from run seconds) and B's run time
relative to A's. Everything comes from the two results tables alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from epbench import figures as figs
from epbench.report import _f, _g, _table, summarize_timing
from epbench.results import read_meta, read_table

#: metrics of the GDU comparison, in the order printed
GDU_METRICS = ("relmse", "sign_agreement", "cosine")
_GDU_KEYS = ["experiment", "algorithm", "flavor", "symmetric", "beta", "layer", "metric"]


@dataclass
class RunComparison:
    """The comparison tables; ``a``/``b`` name the runs (backend and run id)."""

    a: str
    b: str
    gdu: pd.DataFrame
    training: pd.DataFrame
    timing: pd.DataFrame
    reference: str = ""

    def max_gdu_difference(self, metric: str = "relmse") -> float:
        rows = self.gdu[self.gdu["metric"] == metric]
        return float(rows["abs_diff"].max()) if len(rows) else float("nan")


def _label(df: pd.DataFrame, meta: dict, run_dir) -> str:
    """'backend dtype (run id)'."""
    backend = df["backend"].iloc[0] if "backend" in df and len(df) else meta.get("backend", "?")
    dtypes = "/".join(sorted(df["dtype"].dropna().astype(str).unique())) if "dtype" in df else ""
    return f"{backend} {dtypes} ({os.path.basename(os.path.normpath(str(run_dir)))})".replace("  ", " ")


def gdu_means(df: pd.DataFrame) -> pd.DataFrame:
    """Per experiment variant × compared algorithm × layer × metric: the mean over trials of the
    metrics comparing each algorithm's processes with BPTT's (``algorithm``: ``<name>_vs_bptt``)."""
    rows = figs.comparison_rows(df[(df["task"] == "gdu") & df["metric"].isin(GDU_METRICS)])
    if rows.empty:
        return pd.DataFrame(columns=_GDU_KEYS + ["value"])
    return rows.groupby(_GDU_KEYS, sort=False, dropna=False)["value"].mean().reset_index()


def compare_gdu(a: pd.DataFrame, b: pd.DataFrame, ref: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows present in both runs: value_a, value_b, diff = b − a and abs_diff. With a reference
    run (e.g. the same suite in float64), also value_ref and the distances err_a = |a − ref|,
    err_b = |b − ref|: how far each run is from it, e.g. through float32 rounding."""
    both = gdu_means(a).merge(gdu_means(b), on=_GDU_KEYS, suffixes=("_a", "_b"))
    both["diff"] = both["value_b"] - both["value_a"]
    both["abs_diff"] = both["diff"].abs()
    if ref is not None:
        both = both.merge(gdu_means(ref).rename(columns={"value": "value_ref"}), on=_GDU_KEYS)
        both["err_a"] = (both["value_a"] - both["value_ref"]).abs()
        both["err_b"] = (both["value_b"] - both["value_ref"]).abs()
    order = {layer: i for i, layer in enumerate(figs.sort_layers(both["layer"].unique()))}
    both["_order"] = both["layer"].map(order)
    exp_order = {e: i for i, e in enumerate(dict.fromkeys(a["experiment"]))}
    both["_exp"] = both["experiment"].map(exp_order)
    return both.sort_values(["_exp", "algorithm", "symmetric", "beta", "metric", "_order"],
                            kind="stable").drop(columns=["_order", "_exp"])


def _final_errors(df: pd.DataFrame) -> pd.DataFrame:
    rows = df[(df["task"] == "train") & df["metric"].isin(["test_error", "train_error"])]
    if rows.empty:
        return pd.DataFrame(columns=["experiment", "algorithm", "metric", "value"])
    last = rows[rows["epoch"] == rows.groupby(["experiment", "algorithm", "trial"])["epoch"].transform("max")]
    return last.groupby(["experiment", "algorithm", "metric"], sort=False)["value"].mean().reset_index()


def compare_training(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    both = _final_errors(a).merge(_final_errors(b), on=["experiment", "algorithm", "metric"],
                                  suffixes=("_a", "_b"))
    both["diff"] = both["value_b"] - both["value_a"]
    return both


def compare_timing(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per experiment and task (summed over trials): wall, compile and run seconds in A and B, and
    run_ratio = run_s B / run_s A (below 1: B is faster, compilation excluded)."""
    def per_exp(df):
        t = summarize_timing(df)
        return t.groupby(["experiment", "task"], sort=False)[["wall_time_s", "compile_s", "run_s"]].sum().reset_index()

    both = per_exp(a).merge(per_exp(b), on=["experiment", "task"], suffixes=("_a", "_b"))
    with np.errstate(divide="ignore", invalid="ignore"):
        both["run_ratio"] = both["run_s_b"] / both["run_s_a"]
    return both


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike,
                 reference: str | os.PathLike | None = None) -> RunComparison:
    a, b = read_table(run_a), read_table(run_b)
    ref = read_table(reference) if reference else None
    return RunComparison(a=_label(a, read_meta(run_a), run_a), b=_label(b, read_meta(run_b), run_b),
                         gdu=compare_gdu(a, b, ref), training=compare_training(a, b), timing=compare_timing(a, b),
                         reference=_label(ref, read_meta(reference), reference) if ref is not None else "")


def beyond_tolerance(c: RunComparison, tolerance: float, metrics=GDU_METRICS) -> pd.Series:
    """Per GDU row: is |B − A| above ``tolerance``, for a row of one of ``metrics`` (rows of the
    other metrics are never flagged: sign agreement, in %, moves by 100/n at one sign flip of an
    element near 0, which a tolerance meant for RelMSE and cosine would count as a disagreement)."""
    return c.gdu["metric"].isin(list(metrics)) & (c.gdu["abs_diff"] > tolerance)


def render_markdown(c: RunComparison, tolerance: float | None = None, metrics=GDU_METRICS) -> str:
    """The comparison as markdown; with ``tolerance``, GDU rows whose |B − A| exceeds it are
    flagged (rows of ``metrics`` only, :func:`beyond_tolerance`; the others read "—")."""
    out = [f"# epbench compare\n\n**A** = {c.a}  \n**B** = {c.b}"
           + (f"  \n**ref** = {c.reference}" if c.reference else "") + "\n"]
    with_ref = "value_ref" in c.gdu
    if len(c.gdu):
        out.append("## GDU metrics (each algorithm's processes vs BPTT's), mean over trials\n")
        header = (["experiment", "algorithm", "β", "metric", "layer", "A", "B", "B − A"]
                  + (["ref", "|A − ref|", "|B − ref|"] if with_ref else []) + (["within tol."] if tolerance else []))
        rows = []
        for _, r in c.gdu.iterrows():
            beta = f"±{r['beta']:g}" if r["symmetric"] else f"{r['beta']:g}"
            row = [r["experiment"], r["algorithm"], beta, r["metric"], r["layer"], _g(r["value_a"], 4), _g(r["value_b"], 4),
                   f"{r['diff']:+.2g}"]
            if with_ref:
                row += [_g(r["value_ref"], 4), f"{r['err_a']:.2g}", f"{r['err_b']:.2g}"]
            if tolerance:
                row.append("—" if r["metric"] not in metrics else "yes" if r["abs_diff"] <= tolerance else "**no**")
            rows.append(row)
        out.append(_table(header, rows))
        for metric in GDU_METRICS:
            m = c.max_gdu_difference(metric)
            if np.isfinite(m):
                line = f"- largest |B − A| of {metric}: {m:.2g}"
                if with_ref:
                    rows_m = c.gdu[c.gdu["metric"] == metric]
                    line += (f"; largest |A − ref|: {rows_m['err_a'].max():.2g}, "
                             f"largest |B − ref|: {rows_m['err_b'].max():.2g}")
                out.append(line)
        out.append("")
    if len(c.training):
        out.append("## Final errors (%), mean over trials\n")
        rows = [[r["experiment"], r["algorithm"], r["metric"], _f(r["value_a"]), _f(r["value_b"]),
                 f"{r['diff']:+.2f}"] for _, r in c.training.iterrows()]
        out.append(_table(["experiment", "algorithm", "metric", "A", "B", "B − A"], rows) + "\n")
    if len(c.timing):
        out.append("## Timing (seconds; run time excludes compilation)\n")
        rows = [[f"{r['experiment']} ({r['task']})", _f(r["run_s_a"], 3), _f(r["run_s_b"], 3), _f(r["run_ratio"], 2),
                 _f(r["compile_s_a"], 2), _f(r["compile_s_b"], 2), _f(r["wall_time_s_a"], 1),
                 _f(r["wall_time_s_b"], 1)] for _, r in c.timing.iterrows()]
        out.append(_table(["experiment", "run A", "run B", "B / A", "compile A", "compile B", "wall A",
                           "wall B"], rows))
        slower = c.timing[c.timing["run_ratio"] > 1.0]["experiment"].tolist()
        out.append("\n- B slower than A (run time) on: " + (", ".join(slower) if slower else "none"))
    if not (len(c.gdu) or len(c.training) or len(c.timing)):
        out.append("The two runs have no experiment in common.")
    return "\n".join(out) + "\n"
