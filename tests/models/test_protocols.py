"""`ilr evaluate` end to end on fixtures in each dataset's published layout (column names, separators,
id spaces as released), against hand-worked values and the re-implemented official scripts
(tests/official.py): GLDv2 retrieval and recognition per Usage, the Met's three numbers, Stanford
Online Products Recall@K, Revisited Oxford/Paris with per-query AP.

Instances are real photos that ship with scikit-image; an instance's images are overlapping windows of
one photo (different enough that validation sees no train/test near-duplicates)."""
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests import official

pytestmark = pytest.mark.integration

WINDOWS = {"a": (0.0, 0.0, 0.7, 0.7), "b": (0.3, 0.3, 1.0, 1.0), "c": (0.15, 0.15, 0.85, 0.85),
           "d": (0.0, 0.3, 0.7, 1.0), "e": (0.3, 0.0, 1.0, 0.7)}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "camera", "coins", "page")


def view(path: Path, photo: str, window: str, size=(192, 144)) -> Path:
    import skimage

    img = Image.open(Path(skimage.__file__).parent / "data" / f"{photo}.{'jpg' if photo in ('rocket', 'hubble_deep_field', 'retina') else 'png'}").convert("RGB")
    x0, y0, x1, y1 = WINDOWS[window]
    w, h = img.size
    path.parent.mkdir(parents=True, exist_ok=True)
    img.crop((int(x0 * w), int(y0 * h), int(x1 * w), int(y1 * h))).resize(size).save(path, quality=92)
    return path


def _evaluate(name: str, *extra) -> tuple[dict, pd.DataFrame, str]:
    out = CliRunner().invoke(app, ["evaluate", "--dataset", name, *extra])
    assert out.exit_code == 0, out.output
    lines = [ln.split() for ln in out.output.splitlines() if len(ln.split()) == 2]
    values = {k: float(v) for k, v in lines if v.replace(".", "", 1).replace("-", "", 1).isdigit() or v == "nan"}
    csv_path = out.output.split("per-query CSV: ")[1].split(";")[0].strip()
    return values, pd.read_csv(csv_path, dtype={"label": str, "predicted_label": str, "top1_label": str}), out.output


def _ingest(fmt: str, root: Path, name: str, **opts) -> None:
    from data.versioning import ingest

    ingest(fmt, str(root), name, log=lambda *_: None, **opts)


def _gld(root: Path, part: str, image_id: str, photo: str, window: str) -> None:
    view(root / part / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", photo, window)


def test_gldv2_retrieval_and_recognition_the_published_way(workspace, tmp_path):
    root = tmp_path / "gldv2"
    landmarks = {"7": "astronaut", "9": "chelsea", "11": "coffee"}
    train = []
    for n, (lm, photo) in enumerate(landmarks.items()):
        for w in ("a", "d"):
            i = f"{n}{w}00000000000t"
            _gld(root, "train", i, photo, w)
            train.append((i, lm))
    index = {"aa0000000000000i": ("astronaut", "b"), "ab0000000000000i": ("chelsea", "b"),
             "ac0000000000000i": ("coffee", "b"), "ad0000000000000i": ("retina", "b")}
    for i, (photo, w) in index.items():
        _gld(root, "index", i, photo, w)
    # test: three landmark queries (two Public, one Private), a non-landmark query (Private), one Ignored
    test = {"ba0000000000000q": "astronaut", "bb0000000000000q": "chelsea", "bc0000000000000q": "coffee",
            "bd0000000000000q": "page", "be0000000000000q": "hubble_deep_field"}
    for i, photo in test.items():
        _gld(root, "test", i, photo, "c")
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{i},https://x/{i}.jpg,{lm}\n" for i, lm in train))
    (root / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in index))
    (root / "test.csv").write_text("id\n" + "".join(f"{i}\n" for i in test))
    (root / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\n"
        "ba0000000000000q,aa0000000000000i,Public\nbb0000000000000q,ab0000000000000i,Private\n"
        "bc0000000000000q,ac0000000000000i,Public\nbd0000000000000q,None,Ignored\nbe0000000000000q,None,Ignored\n")
    (root / "recognition_solution_v2.1.csv").write_text(
        "id,landmarks,Usage\nba0000000000000q,7,Public\nbb0000000000000q,9,Private\nbc0000000000000q,11,Public\n"
        "bd0000000000000q,,Private\nbe0000000000000q,,Ignored\n")
    _ingest("gldv2", root, "gld")
    v, pq, out = _evaluate("gld")
    # perfect retrieval and recognition: mAP@100 1.0 and GAP 1.0, per Usage too
    for key in ("map_at_100", "map_at_100_public", "map_at_100_private", "gap", "gap_public", "gap_private",
                "gap_landmarks_only", "top1_accuracy", "top1_accuracy_public", "top1_accuracy_private"):
        assert v[key] == pytest.approx(1.0), (key, out)
    # predictions are train landmark ids; the same numbers from DELF's metrics on the per-query CSV
    pq = pq.set_index("query_id")
    assert pq.loc["ba0000000000000q", "predicted_label"] == "7" and pq.loc["bd0000000000000q", "usage"] == "Private"
    solution = {"ba0000000000000q": ["7"], "bb0000000000000q": ["9"], "bc0000000000000q": ["11"], "bd0000000000000q": []}
    preds = {q: {"class": str(pq.loc[q, "predicted_label"]), "score": float(pq.loc[q, "recognition_score"])} for q in solution}
    assert v["gap"] == pytest.approx(official.delf_gap(preds, solution))
    private = {q: s for q, s in solution.items() if pq.loc[q, "usage"] == "Private"}
    assert v["gap_private"] == pytest.approx(official.delf_gap({q: preds[q] for q in private}, private))
    assert v["top1_accuracy"] == pytest.approx(official.delf_top1(preds, solution))
    ret = {"ba0000000000000q": ["aa0000000000000i"], "bb0000000000000q": ["ab0000000000000i"], "bc0000000000000q": ["ac0000000000000i"]}
    assert v["map_at_100"] == pytest.approx(official.delf_map({q: [pq.loc[q, "top1_id"]] for q in ret}, ret))


def test_met_reports_the_three_official_numbers(workspace, tmp_path):
    root = tmp_path / "met"
    gt = root / "ground_truth"
    gt.mkdir(parents=True)
    exhibits = {101: "astronaut", 202: "chelsea", 303: "coffee", 404: "coins"}
    db = []
    for met_id, photo in exhibits.items():
        for w in ("a", "b"):
            db.append({"id": met_id, "path": f"MET/{met_id}/{w}.jpg"})
            view(root / "images" / db[-1]["path"], photo, w)
    # distractors: no art (rocket), and other art that looks exactly like an exhibit (a copy of one of its
    # photos, not an exhibit of the collection): a confident wrong prediction
    test = [{"path": f"test_met/{m}.jpg", "MET_id": m} for m in exhibits] + \
        [{"path": "test_noart/rocket.jpg"}, {"path": "test_other/astronaut.jpg"}]
    val = [{"path": f"val_met/{m}.jpg", "MET_id": m} for m in (101, 202)] + [{"path": "val_noart/retina.jpg"}]
    for it in test:
        other = it["path"].startswith("test_other")
        view(root / "images" / it["path"], exhibits.get(it.get("MET_id"), Path(it["path"]).stem),
             "a" if other else "c", size=(188, 141) if other else (192, 144))
    for it in val:
        view(root / "images" / it["path"], exhibits.get(it.get("MET_id"), Path(it["path"]).stem), "d")
    (gt / "MET_database.json").write_text(json.dumps(db))
    (gt / "testset.json").write_text(json.dumps(test))
    (gt / "valset.json").write_text(json.dumps(val))
    _ingest("met", root, "met")
    v, pq, out = _evaluate("met")
    assert {"met_gap", "met_gap_no_distractors", "met_accuracy"} <= set(v), out
    assert "tuned on 3 validation queries" in out
    # the official numbers from the official code, on the predictions ilr made (per-query CSV)
    truth = [int(x) if isinstance(x, str) and x.isdigit() else -1 for x in pq["label"]]
    preds = [int(x) for x in pq["predicted_label"]]
    assert v["met_gap"] == pytest.approx(official.met_gap(preds, pq["confidence"].to_numpy(), truth), abs=1e-4)
    assert v["met_gap_no_distractors"] == pytest.approx(
        official.met_gap_non_distr(preds, pq["confidence"].to_numpy(), truth), abs=1e-4)
    assert v["met_accuracy"] == pytest.approx(official.met_accuracy(preds, truth), abs=1e-4)
    assert v["met_accuracy"] == 1.0  # every exhibit photographed is recognised
    # the distractors keep their predictions in the ranking: GAP with them is below GAP without them
    assert v["met_gap"] < v["met_gap_no_distractors"] == pytest.approx(1.0)


def test_sop_recall_at_k_is_the_headline(workspace, tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    rows = {"Ebay_train.txt": [], "Ebay_test.txt": []}
    k = 0
    for n, photo in enumerate(("rocket", "page")):
        for w in ("a", "b"):
            k += 1
            rows["Ebay_train.txt"].append((k, n + 1, 1, f"bicycle_final/{n}_{w}.JPG"))
            view(root / rows["Ebay_train.txt"][-1][3], photo, w)
    test_classes = {11: ("astronaut", "astronaut"), 12: ("chelsea", "chelsea"), 13: ("coffee", "coffee"),
                    14: ("hubble_deep_field", "camera")}  # class 14: two unrelated photos (a hard class)
    for cls, photos in test_classes.items():
        for w, photo in zip(("a", "b"), photos):
            k += 1
            rows["Ebay_test.txt"].append((k, cls, 2, f"chair_final/{cls}_{w}.JPG"))
            view(root / rows["Ebay_test.txt"][-1][3], photo, w)
    for name, lines in rows.items():
        (root / name).write_text("image_id class_id super_class_id path\n" + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in lines))
    _ingest("sop", root, "sop")
    v, pq, out = _evaluate("sop")
    for key in ("recall_at_1", "global_recall_at_10", "rerank_recall_at_100", "rerank_recall_at_1000", "Recall@1", "mAP"):
        assert key in v, (key, out)
    # Recall@1 by hand: the queries whose first result has their class
    hand = float((pq["top1_label"].astype(str) == pq["label"].astype(str)).mean())
    assert v["recall_at_1"] == pytest.approx(hand) and 0.5 <= hand <= 1.0
    assert v["rerank_recall_at_1000"] == 1.0  # every class is within the 7 other images


def test_revisited_crops_as_revisitop_and_reports_per_query_ap(workspace, tmp_path):
    root = tmp_path / "roxford5k"
    imlist = {"all_souls_000001": ("astronaut", "a"), "all_souls_000002": ("astronaut", "b"),
              "balliol_000001": ("chelsea", "a"), "oxford_000001": ("coffee", "a"), "oxford_000002": ("rocket", "a")}
    for n, (photo, w) in imlist.items():
        view(root / "jpg" / f"{n}.jpg", photo, w)
    view(root / "jpg" / "all_souls_000013.jpg", "astronaut", "c", size=(240, 180))
    view(root / "jpg" / "balliol_000013.jpg", "chelsea", "c", size=(240, 180))
    names = list(imlist)
    gnd = [{"bbx": np.array([20.0, 15.0, 220.0, 170.0]), "easy": np.array([0]), "hard": np.array([1]), "junk": np.array([], int)},
           {"bbx": np.array([-10.0, 0.0, 250.0, 180.0]), "easy": np.array([2]), "hard": np.array([], int), "junk": np.array([4])}]
    with open(root / "gnd_roxford5k.pkl", "wb") as f:  # as revisitop wrote them: an old pickle protocol
        pickle.dump({"imlist": names, "qimlist": ["all_souls_000013", "balliol_000013"], "gnd": gnd}, f, protocol=2)
    _ingest("roxford", root, "rox")
    v, pq, out = _evaluate("rox")
    assert v["rerank_medium"] == pytest.approx(1.0) and v["rerank_easy"] == pytest.approx(1.0), out
    assert pq["ap"].notna().all() and pq["ap_easy"].notna().all()
    assert list(pq["ap"]) == pytest.approx([1.0, 1.0])
