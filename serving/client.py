"""A small Python client of the retrieval service."""
from __future__ import annotations

import os
from pathlib import Path

from data.errors import IlrError


def _norm(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url.rstrip("/"))
    host = "127.0.0.1" if u.hostname in ("localhost", "127.0.0.1", "::1") else (u.hostname or "")
    return f"{u.scheme}://{host}:{u.port or (443 if u.scheme == 'https' else 80)}{u.path}"


def configured_urls() -> set[str]:
    """The service URLs this workspace trusts with its token and its images: ILR_URL, the URL params.yaml's
    serve section gives, and the one the running service recorded."""
    from serving.config import serve_config
    from serving.service import running, url_of

    urls = {url_of(serve_config())}
    if os.environ.get("ILR_URL"):
        urls.add(os.environ["ILR_URL"])
    st = running()
    if st:
        urls.add(st["url"])
    return {_norm(u) for u in urls}


def is_configured(url: str) -> bool:
    return _norm(url) in configured_urls()


class ServiceError(IlrError):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code = status, code
        super().__init__(f"HTTP {status} {code}: {message}")


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        import httpx

        self.url = (url or os.environ.get("ILR_URL") or "http://127.0.0.1:8000").rstrip("/")
        self.token = token
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def _check(self, r):
        if r.status_code >= 400:
            try:
                e = r.json()["error"]
                raise ServiceError(r.status_code, e["code"], e["message"])
            except (ValueError, KeyError, TypeError):
                raise ServiceError(r.status_code, "http_error", r.text[:300]) from None
        return r.json()

    @staticmethod
    def _image(image) -> tuple[str, bytes]:
        if isinstance(image, (str, Path)):
            from data.images import read_file

            return Path(image).name, read_file(image)
        return "image", bytes(image)

    def search(self, image, top_k: int = 10, rerank: bool = True, return_matches: bool = False) -> dict:
        name, data = self._image(image)
        fields = {"top_k": str(top_k), "rerank": str(rerank).lower(),
                  **({"return_matches": "true"} if return_matches else {})}
        return self._check(self.http.post("/v1/search", files={"image": (name, data)}, data=fields))

    def thumbnail(self, image_id: str) -> bytes | None:
        """The small JPEG the index keeps of an image, or None."""
        r = self.http.get(f"/v1/index/images/{image_id}/thumbnail")
        if r.status_code == 404:
            return None
        self._check(r) if r.status_code >= 400 else None
        return r.content

    def recognize(self, image) -> dict:
        name, data = self._image(image)
        return self._check(self.http.post("/v1/recognize", files={"image": (name, data)}))

    def _auth(self) -> dict:
        from serving.config import api_token

        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if not is_configured(self.url):  # this workspace's token goes only to this workspace's service
            raise IlrError(f"not sending this workspace's API token to {self.url}: it is not the configured service",
                           hint="set ILR_URL to that URL (or serve.host/port in params.yaml), or pass a token")
        return {"Authorization": f"Bearer {api_token()}"}

    def add(self, image, image_id: str, label: str | None = None, domain: str | None = None) -> dict:
        name, data = self._image(image)
        fields = {"image_id": image_id, **({"label": label} if label else {}), **({"domain": domain} if domain else {})}
        return self._check(self.http.post("/v1/index/images", files={"image": (name, data)}, data=fields,
                                          headers=self._auth()))

    def delete(self, image_id: str) -> dict:
        return self._check(self.http.delete(f"/v1/index/images/{image_id}", headers=self._auth()))

    def health(self) -> dict:
        return self._check(self.http.get("/healthz"))

    def embeddings(self, n: int = 500) -> dict:
        return self._check(self.http.get("/v1/monitoring/embeddings", params={"n": n}, headers=self._auth()))

    def metrics(self) -> str:
        r = self.http.get("/metrics")
        r.raise_for_status()
        return r.text
