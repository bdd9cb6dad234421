"""Ingest -> validate (real Great Expectations) -> version (real DVC in a temporary git repo)."""
import hashlib
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from data import manifest
from data.errors import DataFormatError, ValidationFailed
from data.versioning import checkout, dataset_dir, ingest, versions
from flows.cli import app
from tests.conftest import git, jpeg_bytes, make_image

pytestmark = pytest.mark.integration


def _state(repo, home):
    """Everything bad input must leave untouched: git history, the working tree, the DVC cache and remote."""
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) if d.exists() else []
    return (git(repo, "log", "--all", "--oneline"), git(repo, "status", "--porcelain"), git(repo, "tag"),
            files(repo / "data"), files(repo / ".dvc" / "cache"), files(home / "dvc-remote"))


def _photos(root, labels=("tower", "bridge", "statue"), per=3):
    for li, label in enumerate(labels):
        for k in range(per):
            make_image(root / label / f"{k}.jpg", 100 * li + k)
    return root


def test_ingest_versions_and_checkout(workspace, tiny_synthetic, tmp_path):
    home = tmp_path / "home"
    v1, report = ingest("synthetic", str(tiny_synthetic), "syn", log=lambda *_: None)
    assert v1.version == "v1" and v1.dvc_md5.endswith(".dir") and report.success
    assert report.docs_path and (home / "gx").is_dir()
    assert "label_distribution" in report.summary and "near_duplicates" in report.summary
    # git holds the .dvc file, never the payload; the remote holds the payload
    tracked = git(workspace, "ls-files").split()
    assert "data/store/syn.dvc" in tracked and not any(t.startswith("data/store/syn/") for t in tracked)
    assert any((home / "dvc-remote").rglob("*"))
    # re-ingesting the same content is idempotent
    again, _ = ingest("synthetic", str(tiny_synthetic), "syn", log=lambda *_: None)
    assert again.unchanged and again.version == "v1"
    # a changed dataset becomes v2; checkout of v1 restores the old bytes
    changed = tmp_path / "changed"
    shutil.copytree(tiny_synthetic, changed)
    df = manifest.read(changed).iloc[:-1]
    (changed / df["path"].iloc[0]).write_bytes((tiny_synthetic / df["path"].iloc[1]).read_bytes())
    manifest.write(df, changed, manifest.read_info(changed))
    v2, _ = ingest("synthetic", str(changed), "syn", log=lambda *_: None)
    assert v2.version == "v2" and v2.dvc_md5 != v1.dvc_md5
    assert [v.version for v in versions("syn")] == ["v1", "v2"]
    assert versions("syn")[1].counts["split/index"] == v1.counts["split/index"] - 1
    _, folder = checkout("syn@v1")
    assert len(manifest.read(folder)) == len(manifest.read(tiny_synthetic))
    # dataset_dir() materialises whichever version is asked for, in a folder of its own
    _, folder = dataset_dir("syn@v2")
    assert len(manifest.read(folder)) == len(df)
    # a v1 checkout (the CLI's, or a canary's dataset_dir) while a build reads v2 cannot change v2's images
    digest = lambda root: {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()  # noqa: E731
                           for p in sorted(root.rglob("*")) if p.is_file()}
    before = digest(folder)
    _, v1_folder = dataset_dir("syn@v1")
    checkout("syn@v1")
    assert v1_folder != folder and digest(folder) == before
    assert len(manifest.read(v1_folder)) == len(manifest.read(tiny_synthetic))
    # the payload can be restored from the remote alone (a fresh clone's situation)
    shutil.rmtree(workspace / ".dvc" / "cache")
    shutil.rmtree(folder)
    _, folder = checkout("syn@v1")
    assert len(manifest.read(folder)) == len(manifest.read(tiny_synthetic))


def test_folder_of_photos_via_cli(workspace, tmp_path):
    root = _photos(tmp_path / "photos")
    runner = CliRunner()
    res = runner.invoke(app, ["data", "ingest", "--format", "folder", str(root), "--name", "my-photos"])
    assert res.exit_code == 0, res.output
    assert "my-photos@v1" in res.output
    res = runner.invoke(app, ["data", "versions", "my-photos"])
    assert res.exit_code == 0 and "v1" in res.output and "index=9" in res.output


BAD_INPUTS = {
    "truncated JPEG": lambda root: (root / "tower" / "0.jpg").write_bytes(jpeg_bytes(5, (120, 90))[:600]),
    "text named .png": lambda root: (root / "bridge" / "notes.png").write_text("just text"),
    "decompression bomb": lambda root: __import__("PIL.Image").Image.new("L", (10_000, 10_000)).save(
        root / "statue" / "huge.png"),
    "1x1 image": lambda root: __import__("PIL.Image").Image.new("RGB", (1, 1)).save(root / "statue" / "dot.png"),
}


@pytest.fixture(scope="module")
def photos_template(tmp_path_factory):
    """A workspace with a good folder of photos versioned as photos@v1 (made once, copied per case)."""
    import os

    from tests.conftest import _init_repo, workspace_env

    root = tmp_path_factory.mktemp("photos-template")
    _init_repo(root / "repo")
    saved = {k: os.environ.get(k) for k in workspace_env(root)}
    os.environ.update(workspace_env(root))
    try:
        ingest("folder", str(_photos(root / "good")), "photos", log=lambda *_: None)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return root


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_images_are_refused_and_nothing_is_written(tmp_path, monkeypatch, photos_template, case):
    from tests.conftest import _enter, copy_workspace

    copy_workspace(photos_template, tmp_path)
    workspace, home = _enter(tmp_path, monkeypatch), tmp_path / "home"
    before = _state(workspace, home)
    bad = _photos(tmp_path / "bad")
    BAD_INPUTS[case](bad)
    res = CliRunner().invoke(app, ["data", "ingest", "--format", "folder", str(bad), "--name", "photos"])
    assert res.exit_code == 2, res.output
    assert "validation failed" in res.output and "nothing was versioned" in res.output
    name = {"truncated JPEG": "tower__0", "text named .png": "bridge__notes", "decompression bomb": "statue__huge",
            "1x1 image": "statue__dot"}[case]
    assert name in res.output, res.output
    assert "Data Docs" in res.output
    assert _state(workspace, home) == before
    assert not list((home / "staging").iterdir())


@pytest.mark.parametrize("case", ["missing columns", "duplicate ids", "nan labels", "path trick", "empty folder",
                                  "a file, not a folder"])
def test_bad_sources_are_refused(workspace, tmp_path, case):
    home = tmp_path / "home"
    before = _state(workspace, home)
    root = tmp_path / "src"
    (root / "train").mkdir(parents=True)
    if case == "empty folder":
        fmt = "folder"
    elif case == "a file, not a folder":  # said "folder not found"
        fmt, root = "folder", root / "list.txt"
        root.write_text("a/1.jpg\n")
    else:
        fmt = "sop"
        rows = {"missing columns": "image_id path\n1 a/1.jpg\n",
                "duplicate ids": "image_id class_id super_class_id path\n1 1 1 a/1.jpg\n1 1 1 a/2.jpg\n",
                "nan labels": "image_id class_id super_class_id path\n1 NaN 1 a/1.jpg\n2 1 1 a/2.jpg\n",
                "path trick": "image_id class_id super_class_id path\n1 1 1 ../../etc/x.jpg\n"}[case]
        (root / "Ebay_train.txt").write_text(rows)
        (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n")
    with pytest.raises(DataFormatError) as e:
        ingest(fmt, str(root), "bad", log=lambda *_: None)
    assert str(root) in e.value.message
    if case == "a file, not a folder":
        assert e.value.what == "not a folder"
    assert _state(workspace, home) == before


def test_validation_reports_dataset_rules(workspace, tiny_synthetic, tmp_path):
    """Rules beyond decoding: a train class with one image, a query box wholly outside its image, the same
    file in index and query, and a training image duplicated into the query set (leakage)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_synthetic, bad)
    df = manifest.read(bad)
    train = df.index[df["split"] == "train"]
    df = df.drop(index=train[df.loc[train, "label"] == df.loc[train[0], "label"]][1:])  # one image left
    q = df.index[df["split"] == "query"]
    df.at[q[0], "bbox"] = [5000.0, 0.0, 6000.0, 10.0]  # wholly outside the image
    i = df.index[df["split"] == "index"][0]
    (bad / df.at[q[1], "path"]).write_bytes((bad / df.at[i, "path"]).read_bytes())
    t = df.index[df["split"] == "train"][-1]
    (bad / df.at[q[2], "path"]).write_bytes((bad / df.at[t, "path"]).read_bytes())
    manifest.write(df, bad, manifest.read_info(bad))
    with pytest.raises(ValidationFailed) as e:
        ingest("synthetic", str(bad), "syn", log=lambda *_: None)
    text = e.value.message
    for column in ("train_class_size", "bbox_ok", "in_index_and_query", "leaked_near_duplicate_of"):
        assert column in text, text
    assert df.at[q[0], "image_id"] in text
    assert not versions("syn") and not (workspace / "data" / "store" / "syn").exists()
    assert subprocess.run(["git", "tag"], cwd=workspace, capture_output=True, text=True).stdout == ""


def test_clone_without_tags_reingests_to_a_version(workspace, tiny_synthetic):
    """A fresh clone has NAME.dvc committed but may lack the version tags: ingest tags the existing commit."""
    v1, _ = ingest("synthetic", str(tiny_synthetic), "syn", log=lambda *_: None)
    git(workspace, "tag", "-d", "ilr-data/syn/v1")
    again, _ = ingest("synthetic", str(tiny_synthetic), "syn", log=lambda *_: None)
    assert again.version == "v1" and again.git_rev == v1.git_rev and not again.unchanged


def test_path_tricks_in_a_generated_manifest_write_nothing(workspace, tiny_synthetic, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_synthetic, bad)
    df = manifest.read(bad)
    df.loc[0, "image_id"] = "../../../escaped"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pandas(df.astype(object).where(df.notna(), None), preserve_index=False),
                   bad / manifest.MANIFEST)
    with pytest.raises(DataFormatError, match="unsafe image id"):
        ingest("synthetic", str(bad), "syn", log=lambda *_: None)
    assert not list((tmp_path / "home").rglob("escaped*")) and not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("name", ["../escaped", "a/b", ".hidden", ""])
def test_path_tricks_in_a_dataset_name_write_nothing(workspace, tiny_synthetic, tmp_path, name):
    """The error says that the dataset name is unsafe (not an image id); nothing is staged, stored or committed."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout
    with pytest.raises(DataFormatError, match=r"^unsafe dataset name ") as e:
        ingest("synthetic", str(tiny_synthetic), name, log=lambda *_: None)
    assert "image id" not in str(e.value)
    staging = tmp_path / "home" / "staging"
    assert not list(tmp_path.rglob("escaped*")) and not (staging.exists() and any(staging.iterdir()))
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout == head
