"""Monitoring settings (params.yaml `monitoring`)."""
from __future__ import annotations

from dataclasses import dataclass

from data.config import check_ranges, from_params, ilr_home


@dataclass
class MonitorConfig:
    canary_queries: int = 50        # labelled queries sent to the live endpoint per canary run
    k: int = 100                    # mAP@k / top_k asked from the service
    recall_k: int = 10              # recall@k: a relevant image within the first k
    min_map: float = 0.5            # quality drop: mAP@k below this ...
    max_drop: float = 0.15          # ... or this far below the best canary of the same model and index
    max_drift_mmd: float = 0.1      # drift alert: MMD^2 (RBF) between recent queries and the index
    min_ann_recall: float = 0.9     # ANN recall@k vs exact search on a sample of the live index
    ann_sample: int = 100
    worst_queries: int = 6          # the dashboard shows this many of the last canary's worst queries
    suites: bool = True             # each pass also scores the live model on the golden suites (gate.suites;
                                    # cached per model version and setting) and flags a suite that fell more
                                    # than gate.max_regression below the best the service had there

    def __post_init__(self):
        check_ranges("monitoring", self, {"canary_queries": 1, "k": 1, "recall_k": 1, "ann_sample": 1,
                                          "worst_queries": 0})


def monitor_config(**kw) -> MonitorConfig:
    return from_params(MonitorConfig, "monitoring", **kw)


def db_path():
    return ilr_home() / "monitoring.db"
