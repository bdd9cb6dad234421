import hashlib

from data import manifest, synthetic
from data.config import NO_LABEL


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_layout_and_splits(tiny_synthetic):
    df = manifest.read(tiny_synthetic)
    spec = synthetic.SIZES["tiny"]
    n_eval = spec.eval_instances
    assert len(df) == (spec.train_classes * spec.train_views
                       + n_eval * (spec.index_views + spec.query_views) + spec.distractors)
    assert set(df["domain"]) == {"landmark", "artwork", "product"}
    train_labels = set(df.loc[df["split"].isin(["train", "val"]), "label"])
    eval_labels = set(df.loc[df["split"].isin(["index", "query"]), "label"]) - {NO_LABEL}
    assert not train_labels & eval_labels, "train classes must be disjoint from evaluation instances"
    assert (df[df["split"] == "train"].groupby("label").size() >= 2).all()
    q = df[df["split"] == "query"]
    idx_labels = set(df.loc[df["split"] == "index", "label"])
    assert set(q["label"]) <= idx_labels, "every query has its instance in the index"
    assert (df.loc[df["image_id"].str.startswith("distractor"), "label"] == NO_LABEL).all()
    assert manifest.read_info(tiny_synthetic)["protocol"] == "labels"


def test_same_seed_gives_identical_bytes(tiny_synthetic, tmp_path):
    again = synthetic.generate(tmp_path / "again", "tiny", seed=0, workers=1)
    assert len(again)
    assert _digest(tiny_synthetic) == _digest(tmp_path / "again")
    other = synthetic.generate(tmp_path / "other", "tiny", seed=1, workers=1)
    assert _digest(tmp_path / "other")["images/" + other["image_id"][0] + ".jpg"] != \
        _digest(tiny_synthetic).get("images/" + other["image_id"][0] + ".jpg")


def test_instances_sharing_a_style_differ():
    a, _ = synthetic.render_instance(0, "landmark", 0, group=0)
    b, _ = synthetic.render_instance(0, "landmark", 3, group=0)
    assert a.shape == b.shape and (a != b).mean() > 0.05


def test_the_settings_know_the_generator_sizes():
    """data.config checks `synthetic.size`/`demo.size` without importing the generator: the same names."""
    from data.config import SYNTHETIC_SIZES

    assert tuple(synthetic.SIZES) == SYNTHETIC_SIZES
