"""Time series of the service's quality (per query, per suite), latency, drift and ANN recall, and events:
retrain triggers, promotions, index swaps (SQLite)."""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from monitoring.config import db_path

_TABLES = {
    "canary": "ts REAL, model TEXT, idx TEXT, dataset TEXT, queries INTEGER, map_at_k REAL, recall_at_k REAL, "
              "top1 REAL, errors INTEGER, p50_ms REAL, p95_ms REAL, p99_ms REAL, stages TEXT",
    "drift": "ts REAL, model TEXT, idx TEXT, queries INTEGER, mmd REAL, centroid_shift REAL, query_top1_sim REAL, "
             "index_top1_sim REAL",
    "ann": "ts REAL, idx TEXT, recall REAL, k INTEGER, queries INTEGER",
    "events": "ts REAL, kind TEXT, reason TEXT, detail TEXT",
    # one row per dataset per gate decision: the champion after it, and what the challenger scored
    "gate": "ts REAL, dataset TEXT, champion TEXT, served REAL, global_map REAL, challenger TEXT, "
            "challenger_served REAL, decision TEXT",
    "suites": "ts REAL, model TEXT, dataset TEXT, served REAL, global_map REAL",
    # each canary query of a pass (ts = the pass's canary row): its AP@k, domain, and what came first
    "canary_queries": "ts REAL, model TEXT, idx TEXT, dataset TEXT, query_id TEXT, label TEXT, domain TEXT, "
                      "ap REAL, top1 INTEGER, first_id TEXT, first_label TEXT, expected_id TEXT",
    # small JPEGs of the worst queries of the last few passes: the query, an image it should have found,
    # and what the service put first
    "canary_thumbs": "ts REAL, query_id TEXT, query_jpeg BLOB, expected_jpeg BLOB, first_jpeg BLOB",
}
THUMB_RUNS = 3  # passes whose worst-query thumbnails are kept
_lock = threading.Lock()  # one writer at a time (SQLite "database is locked" under concurrency)


class MonitorStore:
    def __init__(self, path: Path | None = None):
        self.path = Path(path or db_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        for name, cols in _TABLES.items():
            self.db.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
        self.db.commit()

    def add(self, table: str, **row) -> None:
        self.add_many(table, [row])

    def add_many(self, table: str, rows: list[dict]) -> None:
        """Rows with the same columns, in one transaction."""
        if not rows:
            return
        ts = time.time()
        rows = [{"ts": ts, **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}}
                for r in rows]
        with _lock:
            self.db.executemany(f"INSERT INTO {table} ({', '.join(rows[0])}) VALUES ({', '.join('?' * len(rows[0]))})",
                                [list(r.values()) for r in rows])
            self.db.commit()

    def domain_quality(self) -> list[tuple[float, str, float, int]]:
        """(pass ts, domain, mAP@k = mean AP@k of its queries, queries) of every canary pass, oldest first."""
        return self.db.execute("SELECT ts, domain, AVG(ap), COUNT(*) FROM canary_queries GROUP BY ts, domain "
                               "ORDER BY ts").fetchall()

    def prune_thumbs(self, keep: int = THUMB_RUNS) -> None:
        with _lock:
            self.db.execute("DELETE FROM canary_thumbs WHERE ts NOT IN (SELECT DISTINCT ts FROM canary_thumbs "
                            "ORDER BY ts DESC LIMIT ?)", (keep,))
            self.db.commit()

    def rows(self, table: str, since: float = 0.0, limit: int = 10_000) -> list[dict]:
        cur = self.db.execute(f"SELECT * FROM {table} WHERE ts >= ? ORDER BY ts LIMIT ?", (since, limit))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def last_event(self, *kinds: str) -> dict | None:
        """The most recent event of one of these kinds (detail decoded), or None."""
        cur = self.db.execute(f"SELECT * FROM events WHERE kind IN ({', '.join('?' * len(kinds))}) "
                              "ORDER BY ts DESC, rowid DESC LIMIT 1", kinds)
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([d[0] for d in cur.description], row))
        out["detail"] = json.loads(out["detail"] or "{}")
        return out

    def close(self) -> None:
        self.db.close()


def record_event(kind: str, reason: str, **detail) -> None:
    """One event (a retrain trigger, a promotion, an index swap, ...) into the workspace's monitoring store;
    the dashboard marks promotions and swaps on its time axes."""
    store = MonitorStore()
    try:
        store.add("events", kind=kind, reason=reason, detail=detail)
    finally:
        store.close()


def record_swap(collection: str, model: str, dataset: str, alias_moved: bool) -> None:
    """An index build that moved the live alias to another collection is an event (the dashboard marks it)."""
    if not alias_moved:
        return
    store = MonitorStore()
    try:
        last = store.last_event("index_swap")
    finally:
        store.close()
    if last is None or last["detail"].get("collection") != collection:
        record_event("index_swap", f"live index -> {collection}", collection=collection, model=model, dataset=dataset)
