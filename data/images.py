"""Safe image probing and decoding: formats, truncation, decompression bombs, tiny images."""
from __future__ import annotations

import hashlib
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from data.errors import ImageError, ImageTooLarge

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")  # nothing that shells out (EPS)

# We check the pixel count ourselves before decoding, with our own limit; PIL's own guard then only
# needs to stop what slips past (it raises above twice this value).
Image.MAX_IMAGE_PIXELS = 200_000_000


@dataclass
class ImageInfo:
    """What probing a file found. `error` is None when the image is usable."""
    width: int = 0
    height: int = 0
    format: str = ""
    sha1: str = ""
    phash: int = 0       # 64-bit DCT perceptual hash (near-duplicate check)
    error: str | None = None


def _open(data: bytes, where: str, max_pixels: int, info: ImageInfo | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(OPEN_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image too large (decompression bomb guard): {e}", where) from None
    except Exception:
        raise ImageError("not an image, or a format that cannot be read (expected JPEG/PNG/WebP/BMP/TIFF/GIF)",
                         where) from None
    w, h = img.size
    if info is not None:
        info.width, info.height, info.format = w, h, img.format or ""
    if w * h > max_pixels:
        raise ImageTooLarge(f"image too large: {w}x{h} = {w * h / 1e6:.1f} megapixels "
                         f"(limit {max_pixels / 1e6:.0f} MP)", where)
    return img


def decode(data: bytes, where: str = "image", max_pixels: int = 40_000_000,
           min_side_px: int = 32, draft_px: int | None = None) -> Image.Image:
    """Decode bytes into an upright RGB PIL image, or raise ImageError saying what is wrong.

    Handles EXIF rotation, CMYK, 16-bit, grayscale, palette and alpha. `draft_px` lets JPEG decode at
    a reduced scale (fast checks).
    """
    if not data:
        raise ImageError("empty file", where)
    img = _open(data, where, max_pixels)
    if min(img.size) < min_side_px:
        raise ImageError(f"image too small: {img.size[0]}x{img.size[1]} px (min side {min_side_px} px)", where)
    try:
        if draft_px and img.format == "JPEG":
            img.draft("RGB", (draft_px, draft_px))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            bg = Image.new("RGB", img.size, (255, 255, 255))
            bg.paste(img, mask=img.getchannel("A"))
            img = bg
        return img.convert("RGB")
    except ImageError:
        raise
    except Exception as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageError(f"{kind} image data ({msg})", where) from None


def decode_scaled(data: bytes, where: str, max_side: int, max_pixels: int = 40_000_000,
                  min_side_px: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 array with its longest side at most about 2 x max_side, original upright (width, height)).
    What a query needs, without the full-size copy: a JPEG decodes at a reduced DCT scale (draft), others
    are box-reduced by an integer factor right after decoding. The extractor resizes to its own input size
    anyway (INTER_AREA), so box-reducing first changes what it sees very little."""
    img = _open(data, where, max_pixels)
    w, h = img.size
    if _exif_swaps(img):
        w, h = h, w
    img = decode(data, where, max_pixels=max_pixels, min_side_px=min_side_px, draft_px=max_side)
    factor = max(img.size) // max(1, max_side)
    if factor >= 2:
        img = img.reduce(factor)
    return np.asarray(img), (w, h)


def thumbnail_jpeg(image, side: int = 256, quality: int = 80) -> bytes:
    """A small JPEG (longest side `side`) of an RGB array or PIL image, aspect kept."""
    img = Image.fromarray(np.asarray(image)) if not isinstance(image, Image.Image) else image
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def file_thumbnail(path: Path | str, side: int = 256, max_pixels: int = 40_000_000) -> bytes | None:
    """thumbnail_jpeg() of an image file (JPEG decoded at a reduced scale), None when it cannot be read."""
    try:
        arr, _ = decode_scaled(Path(path).read_bytes(), str(path), side, max_pixels=max_pixels, min_side_px=1)
    except (OSError, ImageError):
        return None
    return thumbnail_jpeg(arr, side)


def read_file(path: Path | str) -> bytes:
    """The bytes of an image file; ImageError naming the path when it cannot be read (missing, a folder, no
    permission, ...)."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError("file not found", str(path)) from None
    except IsADirectoryError:
        raise ImageError("this is a folder, not an image file", str(path)) from None
    except OSError as e:
        raise ImageError(f"cannot read the file: {e.strerror or e}", str(path)) from None


def load_rgb(path: Path | str, max_pixels: int = 40_000_000, min_side_px: int = 1) -> np.ndarray:
    """Read a file into an RGB uint8 array [H x W x 3]."""
    return np.asarray(decode(read_file(path), str(path), max_pixels=max_pixels, min_side_px=min_side_px))


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash: sign of the low 8x8 DCT coefficients of a 32x32 grayscale thumbnail."""
    from scipy.fft import dctn

    small = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    low = dctn(small, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def probe(path: Path, max_pixels: int, min_side_px: int = 1, max_file_mb: float = 50.0) -> ImageInfo:
    """Open, fully decode (JPEG at reduced scale) and fingerprint one file; never raises."""
    info = ImageInfo()
    try:
        if not path.is_file():
            raise ImageError("file not found", str(path))
        size_mb = path.stat().st_size / 1e6
        if size_mb > max_file_mb:
            raise ImageError(f"file too large: {size_mb:.1f} MB (limit {max_file_mb} MB)", str(path))
        data = path.read_bytes()
        info.sha1 = hashlib.sha1(data).hexdigest()
        head = _open(data, str(path), max_pixels, info)
        img = decode(data, str(path), max_pixels=max_pixels, min_side_px=min_side_px, draft_px=64)
        if head.format == "JPEG" and _exif_swaps(head):
            info.width, info.height = info.height, info.width
        info.phash = phash(img)
    except ImageError as e:
        info.error = e.what
    return info


def _exif_swaps(img: Image.Image) -> bool:
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def probe_many(paths: list[Path], max_pixels: int, min_side_px: int = 1, max_file_mb: float = 50.0,
               workers: int = 4) -> list[ImageInfo]:
    """probe() over many files with a thread pool (PIL and zlib release the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: probe(Path(p), max_pixels, min_side_px, max_file_mb), paths))
