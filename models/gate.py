"""The promotion gate: challenger vs champion on the target dataset and on every golden suite.

A challenger becomes champion only if
- on the target dataset (its validation/query split), its served mAP (global search + re-ranking, with
  the served settings) beats the champion's by more than `gate.margin`, and by more than the noise of the
  query set: the lower end of a paired bootstrap interval over queries of the difference must be above
  the margin;
- on every golden suite (`gate.suites`: real-photo datasets), neither its served mAP nor its global mAP
  (the first stage, which picks what re-ranking sees) is more than `gate.max_regression` below the
  champion's.
Every score, interval and the reason are recorded as tags on the challenger (and each model version's
scores as `eval.<suite>.<metric>` tags), and logged to one MLflow run.

Per-query APs are cached per (model version, dataset version, evaluation setting) under $ILR_HOME, so a
champion is measured once per dataset version, not at every gate.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from data.config import ilr_home
from data.errors import IlrError
from data.versioning import dataset_dir
from models import registry, tracking
from models.config import ExtractConfig, GateConfig, RerankConfig, extract_config, gate_config, rerank_config


@dataclass
class SuiteScores:
    """One model on one dataset version: served (re-ranked) and global mAP, and per-query served APs."""
    dataset: str
    served: float
    global_: float
    aps: list[float]


@dataclass
class GateDecision:
    promoted: bool
    challenger: str
    champion: str | None
    challenger_score: float
    champion_score: float
    margin: float
    reason: str
    run_id: str
    interval: tuple[float, float] = (float("nan"), float("nan"))   # bootstrap interval of the target difference
    suites: dict = field(default_factory=dict)   # dataset (target and suites) -> {challenger, champion, ...}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a - b) over queries, resampling queries with replacement (paired: one query's two
    APs stay together). a, b: [Q] per-query scores of two models on the same queries."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _setting(ecfg: ExtractConfig, rcfg: RerankConfig) -> str:
    blob = json.dumps([asdict(ecfg), asdict(rcfg)], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def score(version: str, ref: str, ecfg: ExtractConfig, rcfg: RerankConfig, log_fn=print) -> SuiteScores:
    """Served and global mAP of registered `version` on the dataset version `ref` (NAME@vN, resolved by the
    caller), cached per dataset version and setting."""
    from models.evaluate import evaluate

    cache = ilr_home() / "gate-cache" / f"{registry.model_name()}-v{version}-{ref.replace('@', '-')}-{_setting(ecfg, rcfg)}.json"
    if cache.exists():
        s = json.loads(cache.read_text())
        log_fn(f"gate: v{version} on {ref}: served mAP {s['served']:.4f}, global {s['global_']:.4f} (measured before)")
        return SuiteScores(**s)
    model, mref = registry.load(version)
    ev = evaluate(ref, rerank=True, ecfg=ecfg, rcfg=rcfg, model=model, model_name=mref, log_mlflow=False,
                  log_fn=log_fn)
    headline = {"revisited": "medium", "gldv2": "map_at_100"}.get(ev.summary["protocol"], "map")
    aps = [float(x) for x in ev.per_query["ap"].fillna(0.0)]
    s = SuiteScores(ref, float(ev.summary[f"rerank_{headline}"]), float(ev.summary[f"global_{headline}"]), aps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(s)))
    log_fn(f"gate: v{version} on {ref}: served mAP {s.served:.4f}, global {s.global_:.4f}")
    return s


def suite_refs(cfg: GateConfig, log_fn=print) -> list[str]:
    """The golden suites as dataset versions (the built-in real-photos suite is versioned on first use)."""
    from data.photos import SUITE_NAME, ensure_suite

    return list(dict.fromkeys(ensure_suite(log_fn) if s == SUITE_NAME else dataset_dir(s)[0].ref
                              for s in cfg.suites))


def gate(dataset: str, cfg: GateConfig | None = None, ecfg: ExtractConfig | None = None,
         rcfg: RerankConfig | None = None, log_fn=print) -> GateDecision:
    """Decide on the challenger (see the module docstring); promote it when it passes."""
    import mlflow

    cfg, ecfg, rcfg = cfg or gate_config(), ecfg or extract_config(), rcfg or rerank_config()
    challenger, champion = registry.alias_version("challenger"), registry.alias_version("champion")
    if not challenger:
        raise IlrError("no model has the alias 'challenger'; register one first")
    if challenger == champion:  # a re-run registered the same model again: nothing to decide
        registry.client().delete_registered_model_alias(registry.model_name(), "challenger")
        reason = f"challenger v{challenger} is the champion already"
        log_fn(f"gate: {reason}")
        return GateDecision(False, challenger, champion, float("nan"), float("nan"), cfg.margin, reason, "")
    target = dataset_dir(dataset)[0].ref
    suites = [r for r in suite_refs(cfg, log_fn) if r != target]
    tracking.setup("ilr-gate")
    with mlflow.start_run(run_name=f"gate v{challenger} vs v{champion} on {target}") as run:
        new = {d: score(challenger, d, ecfg, rcfg, log_fn) for d in [target, *suites]}
        old = {d: score(champion, d, ecfg, rcfg, log_fn) for d in [target, *suites]} if champion else {}
        t_new = new[target]
        lo, hi = paired_bootstrap(t_new.aps, old[target].aps, cfg.bootstrap, cfg.confidence) if champion \
            else (float("nan"), float("nan"))
        failures = []
        table = {}
        for d in [target, *suites]:
            drop_served = old[d].served - new[d].served if champion else 0.0
            drop_global = old[d].global_ - new[d].global_ if champion else 0.0
            table[d] = {"challenger": new[d].served, "champion": old[d].served if champion else None,
                        "challenger_global": new[d].global_, "champion_global": old[d].global_ if champion else None}
            if d != target and max(drop_served, drop_global) > cfg.max_regression:
                failures.append(f"{d} regresses (served {new[d].served:.4f} vs {old[d].served:.4f}, global "
                                f"{new[d].global_:.4f} vs {old[d].global_:.4f}; tolerance {cfg.max_regression})")
        if champion is None:
            win, reason = True, "no champion yet"
        elif failures:
            win, reason = False, "; ".join(failures)
        elif not lo > cfg.margin:
            win = False
            reason = (f"challenger served mAP {t_new.served:.4f} vs champion {old[target].served:.4f} on {target}: "
                      f"the {cfg.confidence:.0%} interval of the difference [{lo:+.4f}, {hi:+.4f}] does not "
                      f"clear the margin {cfg.margin}")
        else:
            win = True
            reason = (f"challenger served mAP {t_new.served:.4f} beats champion {old[target].served:.4f} on {target} "
                      f"(difference in [{lo:+.4f}, {hi:+.4f}], margin {cfg.margin})"
                      + (f"; no golden-suite regression beyond {cfg.max_regression}: {', '.join(suites)}" if suites else ""))
        decision = "promoted" if win else "rejected"
        metrics = {"interval_low": lo, "interval_high": hi}
        for role, scores in (("challenger", new), ("champion", old)):
            for d, s in scores.items():
                metrics[f"{role}.{_key(d)}.served_map"] = s.served
                metrics[f"{role}.{_key(d)}.global_map"] = s.global_
        mlflow.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
        mlflow.set_tags({"gate.decision": decision, "gate.reason": reason[:4000], "gate.dataset": target,
                         "gate.suites": ",".join(suites), "gate.challenger": challenger,
                         "gate.champion": champion or "", "ilr.kind": "gate"})
        for version, scores in ((challenger, new), (champion, old)):
            if version:
                registry.tag(version, {f"eval.{_key(d)}.{m}": f"{v:.4f}" for d, s in scores.items()
                                       for m, v in (("served_map", s.served), ("global_map", s.global_))})
                registry.tag(version, {"eval.map": f"{scores[target].served:.4f}",
                                       "eval.global_map": f"{scores[target].global_:.4f}",
                                       "eval.rerank_map": f"{scores[target].served:.4f}"})
        registry.tag(challenger, {"gate.decision": decision, "gate.reason": reason[:4000], "gate.dataset": target,
                                  "gate.challenger_score": f"{t_new.served:.4f}",
                                  "gate.champion_score": f"{old[target].served:.4f}" if champion else "",
                                  "gate.interval": f"[{lo:+.4f}, {hi:+.4f}]", "gate.champion": champion or "",
                                  "gate.suites": ",".join(suites), "gate.run_id": run.info.run_id,
                                  "gate.at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    if win:
        registry.promote(challenger, reason)
    log_fn(f"gate: {decision} v{challenger}: {reason}")
    return GateDecision(win, challenger, champion, t_new.served, old[target].served if champion else float("-inf"),
                        cfg.margin, reason, run.info.run_id, (lo, hi), table)


def _key(dataset_ref: str) -> str:
    """A dataset ref as a tag/metric key part: `real-photos@v1` -> `real-photos`."""
    return dataset_ref.split("@")[0]
