"""The index changes made through the API, kept per dataset so that no build loses them.

`POST /v1/index/images` and `DELETE /v1/index/images/{id}` change the live collection, but a collection
is rebuilt (resumed) or replaced (a new champion, a new dataset version) from the dataset's manifest. So
every change is first written here — a write-ahead log, one per dataset name, in
`$ILR_HOME/index-changes/NAME/` (SQLite `log.sqlite` plus the added images' bytes, named by their SHA-256)
— and every build replays it (serving.index.build): an id whose last change is a delete is left out
(a takedown stays down), an id whose last change is an add is extracted from the stored bytes with the
build's model (an added image survives a new model). The API's last change of an id wins over the
dataset's image of that id (DELETE then add replaces it).
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from data.config import ilr_home
from data.versioning import check_name


@dataclass(frozen=True)
class Change:
    seq: int
    op: str          # "add" | "delete"
    image_id: str
    label: str
    domain: str
    sha256: str      # of the added image's bytes ("" for a delete)


class Conflict(Exception):
    """The id's last change is an add of other bytes: delete it first."""


class ChangeLog:
    def __init__(self, dataset_name: str, home: Path | None = None):
        self.folder = (home or ilr_home()) / "index-changes" / check_name(dataset_name)
        (self.folder / "blobs").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.folder / "log.sqlite", timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a change the API acknowledged survives a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, "
                         "op TEXT, image_id TEXT, label TEXT, domain TEXT, sha256 TEXT)")
        self._db.execute("CREATE INDEX IF NOT EXISTS changes_id ON changes (image_id, seq)")

    def last(self, image_id: str) -> Change | None:
        """The id's most recent change, or None."""
        row = self._db.execute("SELECT seq, op, image_id, label, domain, sha256 FROM changes WHERE image_id = ? "
                               "ORDER BY seq DESC LIMIT 1", (image_id,)).fetchone()
        return Change(*row) if row else None

    def record_add(self, image_id: str, label: str, domain: str, data: bytes) -> tuple[Change, bool]:
        """Log an add (bytes first, then the row). (change, new): new is False when the id's last change is
        already an add of the same bytes (a retried request); Conflict when it is an add of other bytes."""
        sha = hashlib.sha256(data).hexdigest()
        blob = self.folder / "blobs" / sha
        if not blob.exists():
            tmp = blob.with_name(f".{sha}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, blob)
        self._db.execute("BEGIN IMMEDIATE")  # check and append as one step across processes
        try:
            last = self.last(image_id)
            if last is not None and last.op == "add":
                self._db.execute("ROLLBACK")
                if last.sha256 == sha and (last.label, last.domain) == (label, domain):
                    return last, False
                raise Conflict(f"image_id {image_id!r} was already added through the API with other content")
            cur = self._db.execute("INSERT INTO changes (ts, op, image_id, label, domain, sha256) VALUES "
                                   "(?, 'add', ?, ?, ?, ?)", (time.time(), image_id, label, domain, sha))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return Change(cur.lastrowid, "add", image_id, label, domain, sha), True

    def record_delete(self, image_id: str) -> Change:
        cur = self._db.execute("INSERT INTO changes (ts, op, image_id, label, domain, sha256) VALUES "
                               "(?, 'delete', ?, '', '', '')", (time.time(), image_id))
        return Change(cur.lastrowid, "delete", image_id, "", "", "")

    def state(self) -> dict[str, Change]:
        """The last change per image id, in log order."""
        rows = self._db.execute("SELECT seq, op, image_id, label, domain, sha256 FROM changes c WHERE seq = "
                                "(SELECT MAX(seq) FROM changes WHERE image_id = c.image_id) ORDER BY seq")
        return {r[2]: Change(*r) for r in rows}

    def blob(self, change: Change) -> bytes:
        return (self.folder / "blobs" / change.sha256).read_bytes()

    def close(self) -> None:
        self._db.close()
