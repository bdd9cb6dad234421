import io

import numpy as np
import pytest
from PIL import Image

from data.errors import ImageError
from data.images import decode, probe
from tests.conftest import jpeg_bytes, make_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_truncated_jpeg_is_reported_as_truncated():
    data = jpeg_bytes(1, (200, 150))
    with pytest.raises(ImageError, match="truncated"):
        decode(data[: len(data) // 2], "x.jpg")


def test_corrupt_bytes_and_text_named_png_are_not_images(tmp_path):
    with pytest.raises(ImageError, match="not an image"):
        decode(b"hello, I am text", "notes.png")
    with pytest.raises(ImageError, match="empty"):
        decode(b"", "empty.jpg")
    p = tmp_path / "fake.png"
    p.write_text("not a png at all")
    info = probe(p, max_pixels=10_000_000)
    assert info.error and "not an image" in info.error


def test_decompression_bomb_refused_before_decoding(tmp_path):
    big = tmp_path / "bomb.png"
    Image.new("L", (10_000, 10_000)).save(big)  # 100 megapixels, a few hundred KB on disk
    info = probe(big, max_pixels=40_000_000)
    assert info.error and "too large" in info.error and info.width == 10_000
    with pytest.raises(ImageError, match="megapixels"):
        decode(big.read_bytes(), "bomb.png", max_pixels=40_000_000)


def test_tiny_image_rejected_with_min_side():
    with pytest.raises(ImageError, match="too small"):
        decode(_encode(Image.new("RGB", (1, 1)), "PNG"), "dot.png", min_side_px=32)


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
                                      ("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "WEBP")])
def test_unusual_modes_decode_to_rgb(mode, fmt):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    img = rgb.convert("L").convert(mode) if mode == "I;16" else rgb.convert(mode)
    out = decode(_encode(img, fmt), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (60, 40)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (80, 40), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    out = decode(_encode(img, "JPEG", exif=exif.tobytes()), "rot.jpg")
    assert out.size == (40, 80)


def test_probe_fingerprints_good_images(tmp_path):
    a = probe(make_image(tmp_path / "a.jpg", 1), max_pixels=10_000_000)
    b = probe(make_image(tmp_path / "b.jpg", 2), max_pixels=10_000_000)
    assert a.error is None and (a.width, a.height) == (96, 72) and a.format == "JPEG"
    assert a.sha1 != b.sha1 and a.phash != b.phash


def test_only_safe_formats_are_opened():
    # formats Pillow could read but ilr does not accept (PCX, TGA, ...; EPS would shell out to Ghostscript)
    img = Image.new("RGB", (40, 40), (10, 20, 30))
    for fmt in ("PCX", "TGA", "PPM"):
        with pytest.raises(ImageError, match="not an image"):
            decode(_encode(img, fmt), f"x.{fmt.lower()}")
