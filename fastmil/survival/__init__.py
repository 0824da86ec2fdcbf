"""Discrete-time survival MIL: targets and time bins, the censored negative log-likelihood, risk scores, the
concordance index and time-dependent AUC (scikit-survival), and Kaplan-Meier plots with a log-rank test.

A slide's head outputs one logit per time bin; ``sigmoid`` of it is the discrete hazard ``h_k`` (the probability
of the event in bin ``k`` given survival to it). A patient's slides form one group: their logits are averaged
(:func:`group_logits`) before the loss and the metrics, so a patient counts once whatever their slide count.
"""
from .loss import group_logits, risk_from_logits, survival_nll
from .metrics import concordance_index, survival_metrics, time_dependent_auc
from .plots import logrank_p, save_km_plot
from .targets import (
    SurvivalRecord,
    assign_bins,
    read_survival_csv,
    survival_targets,
    time_bin_edges,
    write_survival_csv,
)

__all__ = ["SurvivalRecord", "assign_bins", "concordance_index", "group_logits", "logrank_p", "read_survival_csv",
           "risk_from_logits", "save_km_plot", "survival_metrics", "survival_nll", "survival_targets",
           "time_bin_edges", "time_dependent_auc", "write_survival_csv"]
