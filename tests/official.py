"""Straightforward re-implementations of the official evaluation scripts, kept beside the tests so that
ilr's metrics (and `ilr evaluate` on the fixtures) can be checked against them number for number.

- GLDv2: DELF's `delf/python/datasets/google_landmarks_dataset/metrics.py` (GlobalAveragePrecision with
  Kaggle's tie order, Top1Accuracy, MeanAveragePrecision at 100).
- The Met: nikosips/met `code/utils/utils.py` (gap, gap_non_distr, classif_accuracy) and
  `code/classifiers/knn_classifier.py` (KNN_Classifier, tune_KNN), distractors labelled -1.
- Stanford Online Products: Recall@K as in Song et al. (CVPR 2016): a query is a hit at K when one of
  its K nearest other images has its class.
"""
import itertools

import numpy as np


def delf_gap(predictions, solution, ignore_non_gt=False):
    """predictions: {id: {"class", "score"}}; solution: {id: [classes]}."""
    positives = sum(1 for v in solution.values() if v)
    ordered = sorted(sorted(predictions.items(), key=lambda it: (it[0], it[1]["class"])),
                     key=lambda it: it[1]["score"], reverse=True)
    gap = 0.0
    total = correct = 0
    for key, p in ordered:
        if ignore_non_gt and not solution[key]:
            continue
        total += 1
        if p["class"] in solution[key]:
            correct += 1
            gap += correct / total
    return gap / positives


def delf_top1(predictions, solution):
    n = ok = 0
    for key, truth in solution.items():
        if truth:
            n += 1
            if key in predictions and predictions[key]["class"] in truth:
                ok += 1
    return ok / n


def delf_map(predictions, solution, max_predictions=100):
    total = 0.0
    for key, pred in predictions.items():
        ap, seen, correct = 0.0, set(), 0
        for i in range(min(len(pred), max_predictions)):
            if pred[i] not in seen:
                if pred[i] in solution[key]:
                    correct += 1
                    ap += correct / (i + 1)
                seen.add(pred[i])
        total += ap / min(len(solution[key]), max_predictions)
    return total / len(solution)


def met_gap(pred, score, class_ids):
    rel = np.equal(np.array(pred, dtype=object), np.array(class_ids, dtype=object))
    rel = rel[np.argsort(-np.array(score), kind="stable")]
    nq = len(pred) - sum(1 for x in class_ids if x == -1)
    prec = np.cumsum(rel) / (1 + np.arange(len(rel)))
    return (prec * rel).sum() / nq


def met_gap_non_distr(pred, score, class_ids):
    class_ids = np.array(class_ids, dtype=object)
    keep = np.where(class_ids != -1)
    p, s = np.array(pred, dtype=object)[keep], np.array(score)[keep]
    rel = np.equal(p, class_ids[keep])[np.argsort(-s, kind="stable")]
    prec = np.cumsum(rel) / (1 + np.arange(len(rel)))
    return (prec * rel).sum() / len(p)


def met_accuracy(pred, class_ids):
    class_ids = np.array(class_ids, dtype=object)
    keep = np.where(class_ids != -1)
    return np.sum(np.equal(np.array(pred, dtype=object)[keep], class_ids[keep])) / len(keep[0])


class MetKNN:
    def __init__(self, k, t):
        self.k, self.t = k, t

    def fit(self, descr, labels):
        self.db, self.labels = np.asarray(descr, np.float64), np.asarray(labels, dtype=object)
        self.n = len(np.unique(self.labels.astype(str)))
        return self

    def predict(self, descr):
        sims = np.asarray(descr, np.float64) @ self.db.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :self.k]
        preds, confs = [], []
        for i in range(len(sims)):
            neigh = self.labels[idx[i]]
            uniq = list(dict.fromkeys(neigh))  # the official np.unique orders labels; ties cannot matter here
            total = np.zeros(len(uniq))
            for j, lab in enumerate(neigh):
                u = uniq.index(lab)
                total[u] = max(total[u], sims[i, idx[i, j]])
            total = np.exp(self.t * total)
            total /= total.sum() + (self.n - len(total))
            preds.append(uniq[int(total.argmax())])
            confs.append(float(total.max()))
        return preds, confs


def met_tune(train, train_labels, val, val_labels, ks=(1, 2, 3, 5, 7, 10, 15, 20, 50),
             ts=(0.01, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 500.0)):
    best, params = -np.inf, None
    for k, t in itertools.product(ks, ts):
        if k > len(train):
            continue
        p, c = MetKNN(k, t).fit(train, train_labels).predict(val)
        g = met_gap(p, c, val_labels)
        if g > best:
            best, params = g, (k, t)
    return params


def sop_recall(sims, labels, ks=(1, 10, 100, 1000)):
    """sims: [N x N] similarities of the test images; each one queries all the others."""
    sims = np.array(sims, np.float64)
    np.fill_diagonal(sims, -np.inf)
    labels = np.asarray(labels)
    order = np.argsort(-sims, axis=1, kind="stable")
    return {k: float(np.mean([(labels[order[i, :min(k, len(labels) - 1)]] == labels[i]).any()
                              for i in range(len(labels))])) for k in ks}
