"""Local features of a collection in a compact, memory-mapped store, and what the live alias serves.

One append-only set of files per collection (uint16 keypoints, int8 descriptors, float32 global vectors
for exact-search recall checks and the re-ranker's refinement) and a SQLite catalogue image_id -> (offset,
count). Reads are memory-mapped; one writer at a time, across processes (a file lock). Torch-free: the
Searcher and Reranker replicas read it without loading the network.
"""
from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from data.config import ilr_home
from models.features import Features, pack_local, unpack_local
from serving.config import index_config
from serving.vectors import VectorIndex


def store_dir(collection: str) -> Path:
    return ilr_home() / "local_features" / collection


class LocalFeatureStore:
    """Append-only local features of one collection, read through memory maps. Thread-safe appends."""

    def __init__(self, folder: Path, dim: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "catalog.sqlite", check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers in other processes (the service) never block
        self._db.execute("CREATE TABLE IF NOT EXISTS features (image_id TEXT PRIMARY KEY, kp_offset INTEGER, "
                         "desc_offset INTEGER, count INTEGER, row INTEGER, width INTEGER, height INTEGER, "
                         "deleted INTEGER DEFAULT 0)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS thumbs (image_id TEXT PRIMARY KEY, jpeg BLOB)")
        self._lock, self._held = threading.RLock(), False
        self._maps: dict[str, tuple[int, np.memmap]] = {}
        with self.writing():  # a writer in another process may be between its append and its commit
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            self.dim = int(stored["dim"]) if "dim" in stored else dim
            self.global_dim = int(stored["global_dim"]) if "global_dim" in stored else None
            self._truncate_to_catalogue()

    @contextlib.contextmanager
    def writing(self):
        """The store's write lock: one writer per store, across threads and processes. Appends, the
        truncation on open and check-then-add sequences (the service's add) hold it."""
        with self._lock:
            if self._held:  # re-entered by the thread that holds it (check-then-add calls add_packed)
                yield
                return
            with open(self._path(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._held = True
                try:
                    yield
                finally:
                    self._held = False

    def _truncate_to_catalogue(self) -> None:
        """Drop bytes written after the last catalogued image (a build interrupted mid-append). Holds the write
        lock: a writer's bytes are catalogued before it releases it, so only a dead writer's remain."""
        end = self._db.execute("SELECT kp_offset + count, desc_offset + count * ?, row + 1 FROM features "
                               "ORDER BY row DESC LIMIT 1", (self.dim or 0,)).fetchone()
        kp_end, desc_end, rows = end if end else (0, 0, 0)
        for name, size in (("keypoints.u16", kp_end * 4), ("descriptors.i8", desc_end),
                           ("global.f32", rows * 4 * (self.global_dim or 0))):
            path = self._path(name)
            if path.exists() and path.stat().st_size > size:
                with open(path, "r+b") as fh:
                    fh.truncate(size)

    def _path(self, name: str) -> Path:
        return self.folder / name

    def __contains__(self, image_id: str) -> bool:
        row = self._db.execute("SELECT deleted FROM features WHERE image_id = ?", (image_id,)).fetchone()
        return row is not None and row[0] == 0

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM features WHERE deleted = 0").fetchone()[0])

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT image_id FROM features WHERE deleted = 0 ORDER BY row")]

    def add(self, image_id: str, f: Features) -> None:
        kp, desc = pack_local(f)
        self.add_packed(image_id, kp, desc, f.global_desc, f.size)

    def add_packed(self, image_id: str, kp: np.ndarray, desc: np.ndarray, global_desc: np.ndarray,
                   size: tuple[int, int]) -> None:
        """Store already packed features (uint16 keypoints, int8 descriptors), as extraction workers send them."""
        f_global, f_size = np.asarray(global_desc, np.float32), size
        with self.writing():
            if self.dim is None:
                self.dim = desc.shape[1]
            if self.global_dim is None:
                self.global_dim = len(f_global)
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                 [("dim", str(self.dim)), ("global_dim", str(self.global_dim))])
            offset = self._append("keypoints.u16", kp) // (2 * 2)
            desc_offset = self._append("descriptors.i8", desc.reshape(-1))
            row = self._append("global.f32", f_global) // (4 * self.global_dim)
            self._db.execute("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                             (image_id, offset, desc_offset, len(kp), row, int(f_size[0]), int(f_size[1])))
            self._db.commit()

    def _append(self, name: str, arr: np.ndarray) -> int:
        """Append raw bytes; return the byte offset where they start."""
        path = self._path(name)
        with open(path, "ab") as fh:
            start = fh.tell()
            fh.write(np.ascontiguousarray(arr).tobytes())
        return start

    def _map(self, name: str, dtype) -> np.memmap:
        size = self._path(name).stat().st_size
        cached = self._maps.get(name)
        if cached is None or cached[0] != size:
            cached = (size, np.memmap(self._path(name), dtype=dtype, mode="r"))
            self._maps[name] = cached
        return cached[1]

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, **values) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in values.items()])
            self._db.commit()

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints float32 [N x 2], descriptors float32 [N x d], unit length)."""
        row = self._db.execute("SELECT kp_offset, desc_offset, count FROM features WHERE image_id = ? AND "
                               "deleted = 0", (image_id,)).fetchone()
        if row is None:
            raise KeyError(image_id)
        off, doff, n = row
        kp = np.asarray(self._map("keypoints.u16", np.uint16)[2 * off:2 * (off + n)]).reshape(n, 2)
        desc = np.asarray(self._map("descriptors.i8", np.int8)[doff:doff + self.dim * n]).reshape(n, self.dim)
        return unpack_local(kp, desc)

    def get_many(self, image_ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]] | None]:
        """Packed features of many images with one lookup: (keypoints uint16 [N x 2], descriptors int8
        [N x d], original (width, height)), or None for an id that is not stored (e.g. deleted meanwhile).
        The re-ranker matches the int8 descriptors directly (models.rerank)."""
        found: dict[str, tuple] = {}
        ids = list(image_ids)
        for start in range(0, len(ids), 500):  # SQLite's limit on bound parameters
            part = ids[start:start + 500]
            found.update((r[0], r[1:]) for r in self._db.execute(
                f"SELECT image_id, kp_offset, desc_offset, count, width, height FROM features WHERE deleted = 0 "
                f"AND image_id IN ({','.join('?' * len(part))})", part))
        kps, descs = self._map("keypoints.u16", np.uint16), self._map("descriptors.i8", np.int8)
        out: list[tuple[np.ndarray, np.ndarray, tuple[int, int]] | None] = []
        for i in ids:
            if i not in found:
                out.append(None)
                continue
            off, doff, n, w, h = found[i]
            out.append((np.asarray(kps[2 * off:2 * (off + n)]).reshape(n, 2),
                        np.asarray(descs[doff:doff + self.dim * n]).reshape(n, self.dim), (int(w), int(h))))
        return out

    def global_many(self, image_ids: Sequence[str]) -> np.ndarray:
        """[N x D] float32 global descriptors of many images, in order; a zero row for an id that is not
        stored (the re-ranker's global refinement reads them for the top-K)."""
        ids = list(image_ids)
        rows: dict[str, int] = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            rows.update(self._db.execute(f"SELECT image_id, row FROM features WHERE deleted = 0 AND image_id IN "
                                         f"({','.join('?' * len(part))})", part).fetchall())
        out = np.zeros((len(ids), self.global_dim or 0), np.float32)
        if rows:
            mat = self._map("global.f32", np.float32).reshape(-1, self.global_dim)
            for i, image_id in enumerate(ids):
                if image_id in rows:
                    out[i] = mat[rows[image_id]]
        return out

    def global_vectors(self) -> tuple[list[str], np.ndarray]:
        """(image_ids, [N x D] float32) of the live images, for exact search."""
        rows = self._db.execute("SELECT image_id, row FROM features WHERE deleted = 0 ORDER BY row").fetchall()
        if not rows:
            return [], np.zeros((0, self.global_dim or 0), np.float32)
        mat = self._map("global.f32", np.float32).reshape(-1, self.global_dim)
        return [r[0] for r in rows], np.asarray(mat[[r[1] for r in rows]])

    def sample_vectors(self, n: int, seed: int = 0) -> np.ndarray:
        """[<= n x D] float32 global descriptors of a fixed random sample of the live images; only those rows
        are read (the monitor's drift check asks for a sample on every pass)."""
        return self.global_many(self.sample_ids(n, seed))

    def sample_ids(self, n: int, seed: int = 0) -> list[str]:
        """Up to n ids of live images, a fixed random sample in storage order."""
        ids = [r[0] for r in self._db.execute("SELECT image_id FROM features WHERE deleted = 0 ORDER BY row")]
        if len(ids) > n:
            ids = [ids[i] for i in np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))]
        return ids

    def put_thumbnail(self, image_id: str, jpeg: bytes) -> None:
        """A small JPEG of the image (the search page and `ilr query --show` draw matches on it)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO thumbs VALUES (?, ?)", (image_id, jpeg))
            self._db.commit()

    def thumbnail(self, image_id: str) -> bytes | None:
        row = self._db.execute("SELECT t.jpeg FROM thumbs t JOIN features f ON f.image_id = t.image_id "
                               "WHERE t.image_id = ? AND f.deleted = 0", (image_id,)).fetchone()
        return row[0] if row else None

    def without_thumbnail(self, image_ids: Sequence[str]) -> list[str]:
        have = {r[0] for r in self._db.execute("SELECT image_id FROM thumbs")}
        return [i for i in image_ids if i not in have]

    def sizes(self, image_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Original (width, height) of stored images."""
        ids = list(image_ids)
        out: dict[str, tuple[int, int]] = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            out.update((r[0], (int(r[1]), int(r[2]))) for r in self._db.execute(
                f"SELECT image_id, width, height FROM features WHERE deleted = 0 AND image_id IN "
                f"({','.join('?' * len(part))})", part))
        return out

    def delete(self, image_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE features SET deleted = 1 WHERE image_id = ? AND deleted = 0", (image_id,))
            self._db.commit()
            return cur.rowcount > 0

    def close(self) -> None:
        self._db.close()


def open_store(stores: dict[str, LocalFeatureStore], collection: str) -> LocalFeatureStore:
    """The store of a collection from a cache of open stores (replicas keep theirs open between requests)."""
    if collection not in stores:
        stores[collection] = LocalFeatureStore(store_dir(collection))
    return stores[collection]


def live(alias: str | None = None, client=None, stores: dict[str, LocalFeatureStore] | None = None) -> dict | None:
    """What the alias serves now — {collection, model, dataset, ..., count} from the collection's store — or
    None. The one place this is computed: the Searcher polls it (with its open stores), the Ingress caches
    the answer for `serve.poll_s`, the flows ask it directly."""
    alias = alias or index_config().alias
    index = VectorIndex(client, alias) if client is not None else VectorIndex.connect(alias)
    name = index.alias_target(alias)
    if name is None:
        return None
    store = open_store(stores, name) if stores is not None else LocalFeatureStore(store_dir(name))
    try:
        return {"collection": name, **store.meta(), "count": store.count()}
    finally:
        if stores is None:
            store.close()


def store_new(index: VectorIndex, store: LocalFeatureStore, image_id: str, label: str, domain: str,
              global_desc: np.ndarray, kp: np.ndarray, desc: np.ndarray, size: tuple[int, int], cfg=None,
              thumbnail: bytes | None = None) -> bool:
    """Add one image unless the collection has it (check and add under the store's write lock, so that two
    writers — the service and a build's replay — never insert an id twice). False when it was there."""
    with store.writing():
        if image_id in store:
            return False
        if not index.client.has_collection(index.name):
            index.create(len(global_desc), cfg or index_config())
        if not index.existing([image_id]):  # a crash between the Milvus insert and the store: in Milvus already
            index.insert([{"image_id": image_id, "label": label, "domain": domain,
                           "vector": np.asarray(global_desc, np.float32).tolist()}])
        store.add_packed(image_id, kp, desc, global_desc, size)
        if thumbnail:
            store.put_thumbnail(image_id, thumbnail)
        return True


def remove(index: VectorIndex, store: LocalFeatureStore, image_id: str) -> bool:
    """Delete one image from the collection; False when it was not there."""
    with store.writing():
        if image_id not in store:
            return False
        index.delete([image_id])
        return store.delete(image_id)
