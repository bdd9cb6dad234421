"""The query beside its top results with the verified correspondences drawn: what `ilr query --show` writes
(the search page draws the same in the browser)."""
from __future__ import annotations

import io

from PIL import Image, ImageDraw

INLIER, OUTLIER, TEXT = (40, 200, 90), (230, 60, 50), (20, 20, 20)


def _fit(img: Image.Image, height: int) -> tuple[Image.Image, float]:
    scale = height / img.height
    return img.resize((max(1, round(img.width * scale)), height), Image.Resampling.LANCZOS), scale


def matches_picture(query: Image.Image, results: list[dict], thumbnails: list[bytes | None],
                    height: int = 300, gap: int = 16, caption: int = 22) -> Image.Image:
    """One row per result: the query (left) and the result's thumbnail (right), inliers as green lines,
    rejected putative matches as thin red ones; a caption with rank, id, label, inliers and score.
    results: /v1/search results with "matches" and "size" (return_matches=true); coordinates are in
    original-image pixels, scaled here to what is drawn."""
    q, q_scale = _fit(query.convert("RGB"), height)
    rows = []
    for r, jpeg in zip(results, thumbnails):
        thumb = Image.open(io.BytesIO(jpeg)).convert("RGB") if jpeg else Image.new("RGB", (height, height), (200,) * 3)
        t, _ = _fit(thumb, height)
        w, h = (r.get("size") or [thumb.width, thumb.height])
        t_scale = height / h  # result pixels -> drawn pixels
        row = Image.new("RGB", (q.width + gap + t.width, height + caption), "white")
        row.paste(q, (0, caption))
        row.paste(t, (q.width + gap, caption))
        draw = ImageDraw.Draw(row)
        draw.text((4, 4), f"#{r['rank']} {r['image_id']} [{r['label']}]  inliers {r['inliers']}  score {r['score']:.3f}",
                  fill=TEXT)
        matches = r.get("matches") or {}
        for kind, colour, width in (("outliers", OUTLIER, 1), ("inliers", INLIER, 2)):
            for qx, qy, cx, cy in matches.get(kind, []):
                a = (qx * q_scale, qy * q_scale + caption)
                b = (q.width + gap + cx * t_scale, cy * t_scale + caption)
                draw.line([a, b], fill=colour, width=width)
        rows.append(row)
    out = Image.new("RGB", (max((r.width for r in rows), default=q.width), sum(r.height + gap for r in rows) or height),
                    "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height + gap
    return out
