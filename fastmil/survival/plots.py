"""Risk-stratified Kaplan-Meier curves with a log-rank test (scikit-survival's estimator and test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["logrank_p", "save_km_plot"]


def logrank_p(time: np.ndarray, event: np.ndarray, high_risk: np.ndarray) -> float | None:
    """Two-sided log-rank p-value between the high- and low-risk groups (None when a group is empty or there is
    no event)."""
    from sksurv.compare import compare_survival

    high_risk = np.asarray(high_risk, bool)
    if high_risk.all() or not high_risk.any() or not np.asarray(event, bool).any():
        return None
    y = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    y["event"], y["time"] = np.asarray(event, bool), np.asarray(time, np.float64)
    _, p = compare_survival(y, high_risk.astype(int))
    return float(p)


def save_km_plot(path: str | Path, time: np.ndarray, event: np.ndarray, high_risk: np.ndarray,
                 title: str = "") -> float | None:
    """Kaplan-Meier curves (95% log-log bands) of the high- and low-risk patients, censoring marks, the log-rank
    p-value in the title; returns that p-value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sksurv.nonparametric import kaplan_meier_estimator

    time, event, high_risk = np.asarray(time, np.float64), np.asarray(event, bool), np.asarray(high_risk, bool)
    p = logrank_p(time, event, high_risk)
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, members, colour in (("low risk", ~high_risk, "tab:blue"), ("high risk", high_risk, "tab:red")):
        if not members.any():
            continue
        t, s, (lo, hi) = kaplan_meier_estimator(event[members], time[members], conf_type="log-log")
        ax.step(np.r_[0.0, t], np.r_[1.0, s], where="post", color=colour,
                label=f"{name} (n={int(members.sum())}, events={int(event[members].sum())})")
        ax.fill_between(np.r_[0.0, t], np.r_[1.0, lo], np.r_[1.0, hi], step="post", color=colour, alpha=0.15)
        censored = members & ~event
        at = np.searchsorted(t, time[censored], side="right") - 1
        ax.plot(time[censored], np.where(at >= 0, s[np.maximum(at, 0)], 1.0), "|", color=colour, markersize=8)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    p_text = "log-rank p = n/a" if p is None else f"log-rank p = {p:.2g}"
    ax.set_title(f"{title}\n{p_text}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return p
