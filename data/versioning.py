"""Dataset versions with git + DVC in the project repository.

A dataset NAME lives in <repo>/<store_dir>/NAME/ (images/, manifest.parquet, dataset.json), tracked by
DVC (NAME.dvc in git, the payload in the DVC cache and remote). Each accepted ingest is one git commit of
NAME.dvc and an annotated tag `ilr-data/NAME/vN` whose message records the DVC hash and the counts.
The default remote is $ILR_HOME/dvc-remote (set in .dvc/config.local); a default remote configured in
.dvc/config (S3, GCS, SSH, ...) is used instead.

Ingest stages and validates outside the store; only a dataset that passed validation is moved in,
so bad input leaves the store, git and DVC as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from data import manifest, synthetic
from data.config import DataConfig, data_config, ilr_home, repo_root
from data.errors import DataFormatError, ImageError, VersioningError
from data.formats import Source, get_reader
from data.locks import workspace_lock
from data.images import IMAGE_EXTENSIONS
from data.validate import Report, validate

TAG_PREFIX = "ilr-data"


@dataclass
class Version:
    name: str
    version: str          # vN
    git_rev: str          # commit that recorded NAME.dvc
    dvc_md5: str          # DVC hash of the dataset folder
    counts: dict
    created: str = ""
    unchanged: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


# ---------------------------------------------------------------------------------------------- plumbing

def _run(cmd: list[str], cwd: Path, what: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise VersioningError(f"{what} failed: {(res.stderr or res.stdout).strip()[-1500:]}", where=str(cwd))
    return res.stdout


def _git(repo: Path, *args: str, what: str = "git") -> str:
    ident = []
    if not subprocess.run(["git", "config", "user.email"], cwd=repo, capture_output=True, text=True).stdout.strip():
        ident = ["-c", "user.name=ilr", "-c", "user.email=ilr@localhost"]
    return _run(["git", *ident, *args], repo, what)


def _dvc(repo: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo, f"dvc {args[0]}")


def repo_lock(repo: Path):
    """DVC allows one process per repository: serialise our own DVC/git work on it."""
    return workspace_lock(f"repo-{hashlib.sha1(str(repo).encode()).hexdigest()[:12]}")


def ensure_repo(repo: Path) -> None:
    """git + DVC initialised, and a default DVC remote (ours under $ILR_HOME unless one is configured)."""
    if not (repo / ".git").exists():
        raise VersioningError("not a git repository (set ILR_REPO or run inside the project checkout)", str(repo))
    if not (repo / ".dvc").is_dir():
        _dvc(repo, "init", "-q")
        _git(repo, "add", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
        _git(repo, "commit", "-q", "-m", "dvc: init", "--", ".dvc/config", ".dvc/.gitignore", ".dvcignore")
    default = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=repo, capture_output=True,
                             text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if default.returncode != 0 or not default.stdout.strip():
        remote = ilr_home() / "dvc-remote"
        remote.mkdir(parents=True, exist_ok=True)
        _dvc(repo, "remote", "add", "--local", "--force", "-d", "ilr-local", str(remote))


def _head(repo: Path) -> str | None:
    """The current commit, or None in a repository without commits."""
    res = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=repo, capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def store_dir(repo: Path, cfg: DataConfig) -> Path:
    return repo / cfg.store_dir


def check_name(name: str) -> str:
    manifest.check_image_id(name, None, what="dataset name")
    return name


# ---------------------------------------------------------------------------------------------- reading

def read_source(fmt: str, source: str, cfg: DataConfig, staging: Path, **opts) -> Source:
    """Any supported format -> Source. `synthetic` takes a size (tiny/small/medium) or a generated folder."""
    if fmt == "synthetic":
        if source in synthetic.SIZES:
            folder = staging / "generated"
            synthetic.generate(folder, source, seed=int(opts.get("seed") or 0), workers=min(2, cfg.workers))
        else:
            folder = Path(source)
            if not synthetic.is_generated(folder):
                raise DataFormatError("not a generated synthetic dataset (no dataset.json with format "
                                      f"'synthetic'); pass a size: {list(synthetic.SIZES)}", where=str(folder))
        df = manifest.read(folder)
        df["src"] = [str((folder / p).resolve()) for p in df["path"]]
        return Source(df, "labels", "synthetic")
    root = Path(source)
    if not root.is_dir():  # every format's source is a folder
        raise DataFormatError("not a folder" if root.exists() else "source not found", where=str(root))
    return get_reader(fmt)(root, val_fraction=cfg.val_fraction, **opts)


def _stage(src: Source, folder: Path, cfg: DataConfig) -> pd.DataFrame:
    """Copy (or hard-link) every image into folder/images/<image_id><ext>; return the manifest."""
    rows = src.rows.reset_index(drop=True).copy()
    for i, v in rows["image_id"].items():  # ids become file names: check them before writing anything
        manifest.check_image_id(v, f"source, row {i + 2}")
    manifest.check_unique_ids(rows, "source")
    missing = [s for s in rows["src"] if not Path(s).is_file()]
    if missing:
        raise ImageError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}", where="source")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id, s in zip(rows["image_id"], rows["src"]):
        ext = Path(s).suffix.lower()
        rel = f"images/{image_id}{ext if ext in IMAGE_EXTENSIONS else '.img'}"
        dst = folder / rel
        if dst.resolve().parent != (folder / "images").resolve():
            raise DataFormatError(f"image id {image_id!r} would leave the dataset folder", where="source")
        if cfg.link:
            try:
                os.link(s, dst)
            except OSError:
                shutil.copyfile(s, dst)
        else:
            shutil.copyfile(s, dst)
        paths.append(rel)
    rows["path"] = paths
    return manifest.normalize(rows.drop(columns="src"), "source")


# ---------------------------------------------------------------------------------------------- versions

def versions(name: str, repo: Path | None = None) -> list[Version]:
    """All versions of a dataset, oldest first."""
    repo = repo or repo_root()
    fmt = "%(refname:lstrip=-1)%09%(*objectname)%09%(creatordate:iso-strict)%09%(contents)%00"
    out = _git(repo, "for-each-ref", "--sort=creatordate", f"--format={fmt}", f"refs/tags/{TAG_PREFIX}/{name}/")
    found = []
    for rec in out.split("\0"):
        rec = rec.strip()
        if not rec:
            continue
        ver, rev, created, msg = rec.split("\t", 3)
        meta = json.loads(msg.strip().splitlines()[-1])
        found.append(Version(name, ver, rev, meta.get("dvc_md5", ""), meta.get("counts", {}), created))
    return sorted(found, key=lambda v: int(v.version[1:]))


def parse_ref(ref: str) -> tuple[str, str | None]:
    name, _, ver = ref.partition("@")
    return check_name(name), (ver or None)


def find_version(name: str, version: str | None, repo: Path) -> Version:
    all_ = versions(name, repo)
    if not all_:
        raise VersioningError(f"dataset {name!r} has no versions; ingest it first (ilr data ingest)")
    if version in (None, "", "latest"):
        return all_[-1]
    for v in all_:
        if version in (v.version, v.git_rev) or (len(version) >= 7 and v.git_rev.startswith(version)):
            return v
    raise VersioningError(f"no version {version!r} of {name!r}; known: {', '.join(v.version for v in all_)}")


def _dvc_md5(dvc_file: Path) -> str:
    meta = yaml.safe_load(dvc_file.read_text())
    return meta["outs"][0]["md5"]


def ingest(fmt: str, source: str, name: str, cfg: DataConfig | None = None, repo: Path | None = None,
           log=print, **opts) -> tuple[Version, Report]:
    """Read -> stage -> validate -> (only if valid) move into the store, dvc add, git commit, dvc push, tag."""
    cfg = cfg or data_config()
    repo = repo or repo_root()
    check_name(name)
    staging_root = ilr_home() / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = staging_root / f"{name}-{os.getpid()}-{time.time_ns()}"
    try:
        t0 = time.perf_counter()
        src = read_source(fmt, source, cfg, staging, **opts)
        folder = staging / name
        df = _stage(src, folder, cfg)
        log(f"read {len(df)} images ({fmt}) in {time.perf_counter() - t0:.1f}s; validating...")
        report = validate(df, folder, name, cfg, report_path=ilr_home() / "reports" / f"validation-{name}.json",
                          origin=src.rows["src"].reset_index(drop=True))
        manifest.write(df, folder, {"name": name, "format": src.format, "protocol": src.protocol,
                                    "source": str(source)})
        with repo_lock(repo):
            ensure_repo(repo)
            version = _commit(folder, name, df, src.format, repo, cfg)
        return version, report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staged: Path, name: str, df: pd.DataFrame, fmt: str, repo: Path, cfg: DataConfig) -> Version:
    store = store_dir(repo, cfg)
    store.mkdir(parents=True, exist_ok=True)
    target, old = store / name, store / f".{name}.previous"
    dvc_file = store / f"{name}.dvc"
    rel = target.relative_to(repo).as_posix()
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    shutil.move(str(staged), str(target))
    ignore_file = store / ".gitignore"
    head = _head(repo)
    committed = False
    prior = dvc_file.read_text() if dvc_file.exists() else None
    prior_ignore = ignore_file.read_text() if ignore_file.exists() else None
    try:
        _dvc(repo, "add", "-q", rel)
        md5 = _dvc_md5(dvc_file)
        existing = versions(name, repo)
        if existing and existing[-1].dvc_md5 == md5:
            latest = existing[-1]
            latest.unchanged = True
            shutil.rmtree(old, ignore_errors=True)
            return latest
        gitignore = ignore_file.relative_to(repo).as_posix()
        dvc_rel = dvc_file.relative_to(repo).as_posix()
        _dvc(repo, "push", "-q", dvc_rel)  # the payload reaches the remote before git records it
        n = max((int(v.version[1:]) for v in existing), default=0) + 1
        counts = manifest.counts(df)
        paths = [dvc_rel] + ([gitignore] if ignore_file.exists() else [])  # absent when git ignores it already
        _git(repo, "add", *paths)
        if _git(repo, "status", "--porcelain", "--", *paths).strip():
            _git(repo, "commit", "-q", "-m", f"data: {name} v{n} ({len(df)} images, {fmt})", "--", *paths)
            committed = True
        # else: git already records this content (e.g. a clone without our tags): tag that commit
        rev = _git(repo, "log", "-1", "--format=%H", "--", dvc_rel).strip()
        meta = {"dvc_md5": md5, "counts": counts, "format": fmt}
        _git(repo, "tag", "-a", f"{TAG_PREFIX}/{name}/v{n}", "-m", f"{name} v{n}\n\n{json.dumps(meta)}")
    except BaseException:  # put the previous state back, whatever went wrong
        if committed and head:
            subprocess.run(["git", "reset", "-q", "--soft", head], cwd=repo, capture_output=True)
        rels = [p.relative_to(repo).as_posix() for p in (dvc_file, ignore_file)]
        subprocess.run(["git", "reset", "-q", "--", *rels], cwd=repo, capture_output=True)  # unstage
        shutil.rmtree(target, ignore_errors=True)
        if old.exists():
            old.rename(target)
        for f, text in ((dvc_file, prior), (ignore_file, prior_ignore)):
            if text is not None:
                f.write_text(text)
            elif f.exists():
                f.unlink()
        raise
    shutil.rmtree(old, ignore_errors=True)
    return Version(name, f"v{n}", rev, md5, counts)


def checkout(ref: str, repo: Path | None = None, cfg: DataConfig | None = None) -> tuple[Version, Path]:
    """Restore NAME@VERSION into the store (git checkout of NAME.dvc, then dvc checkout or pull)."""
    cfg = cfg or data_config()
    repo = repo or repo_root()
    name, ver = parse_ref(ref)
    v = find_version(name, ver, repo)
    with repo_lock(repo):
        _restore(v, repo, cfg)
    return v, store_dir(repo, cfg) / name


def _restore(v: Version, repo: Path, cfg: DataConfig) -> Path:
    """Make the store's working folder hold version v (caller holds the repo lock)."""
    ensure_repo(repo)
    folder = store_dir(repo, cfg) / v.name
    dvc_file = store_dir(repo, cfg) / f"{v.name}.dvc"
    dvc_rel = dvc_file.relative_to(repo).as_posix()
    if dvc_file.exists() and (folder / manifest.MANIFEST).exists() and _dvc_md5(dvc_file) == v.dvc_md5:
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "-q", dvc_rel], cwd=repo, capture_output=True)
        if status.returncode == 0:
            return folder
    _git(repo, "checkout", v.git_rev, "--", dvc_rel)
    try:
        _dvc(repo, "checkout", "-q", "--force", dvc_rel)
    except VersioningError:
        _dvc(repo, "pull", "-q", "--force", dvc_rel)
    return folder


def snapshot_root() -> Path:
    return ilr_home() / "datasets"


def dataset_dir(ref: str, repo: Path | None = None, cfg: DataConfig | None = None) -> tuple[Version, Path]:
    """The folder holding NAME@VERSION for readers (training, evaluation, index builds, the canary): a snapshot
    of that version only, `$ILR_HOME/datasets/NAME/vN-<dvc hash>/`, made once from the store (hard links, so
    no copy of the images) and never changed afterwards. Versions never share a folder, so checking out
    another version (`ilr data checkout`, a canary on v1) cannot change what a build of v2 is reading.
    Snapshots can be deleted at any time; they are made again on demand."""
    cfg = cfg or data_config()
    repo = repo or repo_root()
    name, ver = parse_ref(ref)
    v = find_version(name, ver, repo)
    snap = snapshot_root() / name / f"{v.version}-{v.dvc_md5.removesuffix('.dir')[:16]}"
    if (snap / ".complete").exists():
        return v, snap
    with repo_lock(repo):
        if not (snap / ".complete").exists():
            folder = _restore(v, repo, cfg)
            tmp = snap.with_name(f".{snap.name}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # files are replaced, never rewritten in place (DVC checkout, ingest), so a hard link keeps this
            # version's bytes whatever the store holds later; another file system gets copies
            shutil.copytree(folder, tmp, copy_function=_link_or_copy)
            (tmp / ".complete").write_text(v.ref)
            shutil.rmtree(snap, ignore_errors=True)
            os.replace(tmp, snap)
    return v, snap


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
