"""ilr's VectorIndex against a real Milvus server (Milvus 2.3.5 standalone from the `milvus` package), as
`MILVUS_URI` uses one. Run by test_milvus_server.py inside a private network namespace (`unshare -rn`),
because that server listens on every interface. Prints "ok" when every check passed."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serving.config import IndexConfig  # noqa: E402
from serving.vectors import VectorIndex, recall_at_k  # noqa: E402


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    from milvus import MilvusServer

    server = MilvusServer()
    server.set_base_dir(tempfile.mkdtemp(prefix="ilr-milvus-server-"))
    server.start()
    try:
        uri = f"http://127.0.0.1:{server.listen_port}"
        rng = np.random.default_rng(0)
        x = rng.normal(size=(300, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"img{i}" for i in range(len(x))]
        a = VectorIndex.connect("ilr_check_a", uri=uri)
        a.create(16, IndexConfig())
        a.insert([{"image_id": i, "label": f"l{n % 7}", "domain": "landmark", "vector": v.tolist()}
                  for n, (i, v) in enumerate(zip(ids, x))])
        a.seal()  # flush + wait for the server's asynchronous index build + load
        assert a.count() == 300, a.count()
        hits = a.search(x[:3], 5)
        assert [h[0]["image_id"] for h in hits] == ids[:3], hits
        assert hits[1][0]["label"] == "l1" and hits[1][0]["domain"] == "landmark" and hits[1][0]["score"] > 0.99
        assert a.existing(["img5", "nope"]) == {"img5"}
        assert recall_at_k(a, ids, x, 100, 50, 128) >= 0.95
        a.point_alias("ilr_live")
        assert a.alias_target("ilr_live") == "ilr_check_a"
        b = VectorIndex.connect("ilr_check_b", uri=uri)
        b.create(16, IndexConfig())
        b.insert([{"image_id": "only", "label": "x", "domain": "artwork", "vector": x[0].tolist()}])
        b.seal()
        b.point_alias("ilr_live")  # the swap the service picks up
        live = VectorIndex.connect("ilr_live", uri=uri)
        assert live.alias_target("ilr_live") == "ilr_check_b"
        assert [h["image_id"] for h in live.search(x[:1], 5)[0]] == ["only"]
        a.delete(["img0"])
        deadline = time.monotonic() + 15  # a server's default consistency is bounded staleness
        while a.search(x[:1], 5)[0][0]["image_id"] == "img0":
            assert time.monotonic() < deadline, "a deleted image is still found"
            time.sleep(0.5)
        print("ok")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
