"""Each reader on a small fixture in the format's exact layout, and its structural errors."""
import json
import pickle

import numpy as np
import pytest

from data import manifest
from data.config import NO_LABEL
from data.errors import DataFormatError
from data.formats import folder, gldv2, met, roxford, sop
from tests.conftest import make_image


def _gld_img(root, part, image_id, seed):
    return make_image(root / part / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg", seed)


@pytest.fixture
def gld_root(tmp_path):
    root = tmp_path / "gldv2"
    train = [("0a1b2c3d4e5f6071", "7"), ("1a1b2c3d4e5f6071", "7"), ("2a1b2c3d4e5f6071", "7"),
             ("3a1b2c3d4e5f6071", "9"), ("4a1b2c3d4e5f6071", "9"), ("5a1b2c3d4e5f6071", "9")]
    for k, (i, _) in enumerate(train):
        _gld_img(root, "train", i, k)
    index = ["aa00000000000001", "ab00000000000002", "ac00000000000003"]
    test = ["ba00000000000001", "bb00000000000002", "bc00000000000003"]
    for k, i in enumerate(index):
        _gld_img(root, "index", i, 10 + k)
    for k, i in enumerate(test):
        _gld_img(root, "test", i, 20 + k)
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{i},http://x/{i}.jpg,{l}\n" for i, l in train))
    (root / "train_clean.csv").write_text("landmark_id,images\n7 ,0a1b2c3d4e5f6071 1a1b2c3d4e5f6071 2a1b2c3d4e5f6071\n"
                                          "9,3a1b2c3d4e5f6071 4a1b2c3d4e5f6071 5a1b2c3d4e5f6071\n".replace("7 ,", "7,"))
    (root / "index.csv").write_text("id\n" + "\n".join(index) + "\n")
    (root / "test.csv").write_text("id\n" + "\n".join(test) + "\n")
    (root / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\nba00000000000001,aa00000000000001 ab00000000000002,Public\n"
        "bb00000000000002,None,Ignored\nbc00000000000003,ac00000000000003,Private\n")
    (root / "recognition_solution_v2.1.csv").write_text(
        "id,landmarks,Usage\nba00000000000001,7,Public\nbb00000000000002,,Private\nbc00000000000003,9,Ignored\n")
    return root


def test_gldv2_reader(gld_root):
    src = gldv2.read(gld_root, val_fraction=0.0)
    df = src.rows.set_index("image_id")
    assert src.protocol == "gldv2"
    assert (df["split"] == "train").sum() == 6 and (df["split"] == "index").sum() == 3
    q = df[df["split"] == "query"]
    # ba: both solutions; bb: recognition only (non-landmark); bc: retrieval only (recognition row Ignored)
    assert sorted(q.index) == ["ba00000000000001", "bb00000000000002", "bc00000000000003"]
    assert q.loc["ba00000000000001", "gt_easy"] == ["aa00000000000001", "ab00000000000002"]
    assert q.loc["ba00000000000001", "gt_labels"] == ["7"] and q.loc["ba00000000000001", "label"] == "7"
    assert q.loc["bb00000000000002", "gt_labels"] == [] and q.loc["bb00000000000002", "label"] == NO_LABEL
    assert df.loc["0a1b2c3d4e5f6071", "src"].endswith("train/0/a/1/0a1b2c3d4e5f6071.jpg")
    # index images carry no landmark id (the release has none, and other id spaces must not mix with train ids)
    assert (df[df["split"] == "index"]["label"] == NO_LABEL).all()
    # each query keeps its Usage, for the Public / Private report
    assert q.loc["ba00000000000001", "source"] == "gldv2:test:Public"
    assert q.loc["bb00000000000002", "source"] == "gldv2:test:Private"


def test_gldv2_refuses_an_unknown_usage(gld_root):
    f = gld_root / "retrieval_solution_v2.1.csv"
    f.write_text(f.read_text().replace("Private", "private"))
    with pytest.raises(DataFormatError, match="Usage 'private' is not one of Public, Private, Ignored") as e:
        gldv2.read(gld_root)
    assert "row 4" in str(e.value)


def test_gldv2_missing_columns_and_path_tricks(gld_root):
    (gld_root / "index.csv").write_text("image\naa00000000000001\n")
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['id'\]") as e:
        gldv2.read(gld_root)
    assert "index.csv" in str(e.value)
    (gld_root / "index.csv").write_text("id\n../../etc/passwd\n")
    with pytest.raises(DataFormatError, match="unsafe image id") as e:
        gldv2.read(gld_root)
    assert "row 2" in str(e.value)


def test_gldv2_duplicate_ids_and_nan_labels(gld_root):
    (gld_root / "train.csv").write_text("id,url,landmark_id\n0a1b2c3d4e5f6071,u,7\n0a1b2c3d4e5f6071,u,7\n")
    with pytest.raises(DataFormatError, match="duplicate"):
        gldv2.read(gld_root)
    (gld_root / "train.csv").write_text("id,url,landmark_id\n0a1b2c3d4e5f6071,u,\n1a1b2c3d4e5f6071,u,NaN\n")
    with pytest.raises(DataFormatError, match="missing/NaN label") as e:
        gldv2.read(gld_root)
    assert "row 2" in str(e.value)


def test_roxford_reader(tmp_path):
    root = tmp_path / "roxford5k"
    imlist = ["all_souls_000001", "all_souls_000002", "balliol_000001", "oxford_003410"]
    for k, n in enumerate(imlist + ["all_souls_000013", "all_souls_000014"]):
        make_image(root / "jpg" / f"{n}.jpg", k)
    gnd = [{"bbx": np.array([10.0, 5.0, 80.0, 60.0]), "easy": np.array([0]), "hard": [1], "junk": [2]},
           {"bbx": np.array([0.0, 0.0, 5.0, 5.0]), "easy": np.array([0]), "hard": np.array([], np.int64),
            "junk": np.array([], np.int64)}]  # empty arrays, as most queries' junk lists
    # revisitop's gnd_roxford5k.pkl / gnd_rparis6k.pkl are old-protocol pickles with numpy arrays (their bytes
    # go through _codecs.encode): every protocol loads, without unsafe unpickling
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with open(root / "gnd_roxford5k.pkl", "wb") as f:
            pickle.dump({"imlist": imlist, "qimlist": ["all_souls_000013", "all_souls_000014"], "gnd": gnd}, f,
                        protocol=protocol)
        src = roxford.read(root)
        q = src.rows[src.rows["split"] == "query"].iloc[0]
        assert src.protocol == "revisited" and q["bbox"] == [10.0, 5.0, 80.0, 60.0]
        assert q["gt_easy"] == ["all_souls_000001"] and q["gt_hard"] == ["all_souls_000002"]
        assert q["gt_junk"] == ["balliol_000001"]
        assert (src.rows["split"] == "index").sum() == 4
    # two ground-truth files: an error, unless one is chosen
    (root / "gnd_rparis6k.pkl").write_bytes((root / "gnd_roxford5k.pkl").read_bytes())
    with pytest.raises(DataFormatError, match="2 ground-truth files .*--gnd"):
        roxford.read(root)
    assert len(roxford.read(root, gnd="roxford5k").rows) == 6
    assert len(roxford.read(root, gnd="gnd_rparis6k.pkl").rows) == 6
    with pytest.raises(DataFormatError, match="no ground-truth file gnd_other.pkl"):
        roxford.read(root, gnd="other")


def test_roxford_refuses_code_in_pickle(tmp_path):
    root = tmp_path / "rparis6k"
    root.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(DataFormatError, match="refusing to unpickle"):
        roxford.read(root)


def test_folder_reader_leave_one_out_and_queries(tmp_path):
    root = tmp_path / "photos"
    for label in ("Big Ben", "eiffel"):
        for k in range(3):
            make_image(root / label / f"img {k}.jpg", hash((label, k)) % 1000)
    (root / "eiffel" / "notes.txt").write_text("ignored")
    src = folder.read(root, domain="landmark")
    assert src.protocol == "leave_one_out" and len(src.rows) == 6
    assert set(src.rows["label"]) == {"Big Ben", "eiffel"} and (src.rows["split"] == "index").all()
    assert "Big-Ben__img-0" in set(src.rows["image_id"])
    qfile = tmp_path / "q.txt"
    qfile.write_text("eiffel/img 0.jpg\n")
    src = folder.read(root, queries=qfile)
    assert src.protocol == "labels" and (src.rows["split"] == "query").sum() == 1


def test_folder_reader_empty_folder(tmp_path):
    (tmp_path / "empty" / "label").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no images found"):
        folder.read(tmp_path / "empty")


def test_met_reader(tmp_path):
    root = tmp_path / "met"
    gt = root / "ground_truth"
    gt.mkdir(parents=True)
    db = [{"id": 101, "path": "MET/101/0.jpg"}, {"id": 101, "path": "MET/101/1.jpg"}, {"id": 202, "path": "MET/202/0.jpg"}]
    test = [{"path": "test_met/0.jpg", "MET_id": 101}, {"path": "test_noart/5.jpg"}]
    for k, it in enumerate(db + test):
        make_image(root / "images" / it["path"], k)
    (gt / "MET_database.json").write_text(json.dumps(db))
    (gt / "testset.json").write_text(json.dumps(test))
    (gt / "valset.json").write_text(json.dumps([{"path": "val_met/1.jpg", "MET_id": 202}]))
    make_image(root / "images" / "val_met/1.jpg", 9)
    (gt / "mini_MET_database.json").write_text(json.dumps(db[:1]))
    src = met.read(root)
    df = src.rows.set_index("image_id")
    assert src.protocol == "met"
    assert df.loc["MET-101-0", "label"] == "101" and df.loc["MET-101-0", "split"] == "index"
    assert df.loc["test_met-0", "label"] == "101" and df.loc["test_noart-5", "label"] == NO_LABEL
    # both query sets, told apart by their source: test is scored, val tunes the k-NN classifier
    assert df.loc["test_met-0", "source"] == "met:test:test_met/0.jpg"
    assert df.loc["val_met-1", "source"] == "met:val:val_met/1.jpg" and df.loc["val_met-1", "split"] == "query"
    assert (df["domain"] == "artwork").all()
    mini = met.read(root, mini=True).rows
    assert (mini["split"] == "index").sum() == 1
    (gt / "testset.json").write_text(json.dumps([{"path": "../../secret.jpg"}]))
    with pytest.raises(DataFormatError, match="escapes"):
        met.read(root)


def test_sop_reader(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    lines = {"Ebay_train.txt": [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG"),
                                (3, 2, 1, "bicycle_final/222_0.JPG"), (4, 2, 1, "bicycle_final/222_1.JPG")],
             "Ebay_test.txt": [(1, 9, 2, "chair_final/999_0.JPG"), (2, 9, 2, "chair_final/999_1.JPG")]}
    k = 0
    for name, rows in lines.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("image_id class_id super_class_id path\n"
                                 + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rows))
        for *_, p in rows:
            make_image(root / p, k, fmt="JPEG")
            k += 1
    src = sop.read(root, val_fraction=0.0)
    assert src.protocol == "sop"
    assert (src.rows["split"] == "train").sum() == 4 and (src.rows["split"] == "index").sum() == 2
    assert (src.rows["domain"] == "product").all()


def test_manifest_roundtrip_and_normalize_errors(tmp_path):
    import pandas as pd

    df = pd.DataFrame([{"image_id": "a", "path": "images/a.jpg", "label": "x", "split": "query",
                        "domain": "landmark", "bbox": [0.0, 0.0, 1.0, 1.0], "gt_easy": ["b"]},
                       {"image_id": "b", "path": "images/b.jpg", "label": "x", "split": "index",
                        "domain": "landmark"}])
    m = manifest.normalize(df, "t")
    manifest.write(m, tmp_path, {"name": "t", "format": "folder", "protocol": "labels"})
    back = manifest.read(tmp_path)
    assert back.loc[0, "bbox"] == [0.0, 0.0, 1.0, 1.0] and back.loc[0, "gt_easy"] == ["b"]
    assert back.loc[1, "gt_easy"] is None
    assert manifest.read_info(tmp_path)["counts"] == {"index/landmark": 1, "query/landmark": 1}
    with pytest.raises(DataFormatError, match="split 'test'"):
        manifest.normalize(df.assign(split="test"), "t")
    with pytest.raises(DataFormatError, match="unsafe"):
        manifest.normalize(df.assign(image_id=["a/b", "c"]), "t")


def test_ids_with_a_trailing_newline_are_unsafe():
    with pytest.raises(DataFormatError):
        manifest.check_image_id("abc\n", "t")
