"""Images from request bytes, one decoder for every image model: Pillow with a pixel limit (decompression bombs
refused before any pixel is allocated) and EXIF orientation applied, and the batched JPEG decode of
torchvision.io.decode_jpeg (nvJPEG on CUDA) for the JPEGs that decode to the same pixels."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from servekit_worker.errors import RequestError

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"


@contextlib.contextmanager
def image_errors() -> Iterator[None]:
    """Pillow's failures on a client's bytes -> the request's 400."""
    try:
        yield
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise RequestError("invalid_image", "the body is not an image Pillow can read (PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise RequestError("invalid_image", f"cannot decode the image: {exc}") from None


def image_header(raw: bytes, max_pixels: int) -> Image.Image:
    """Image bytes opened lazily: Pillow reads only the header (format, size, mode, EXIF), and decompression
    bombs are refused before any pixel is allocated."""
    with image_errors():
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise RequestError(
                "image_too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
    return image


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully and upright (EXIF orientation applied), refusing decompression bombs before any
    pixel is allocated."""
    image = image_header(raw, max_pixels)
    with image_errors():
        image.load()
        # Phones store portrait photos rotated with an EXIF Orientation tag: apply it before anything else.
        ImageOps.exif_transpose(image, in_place=True)
    return image


def decode_pixels(raw: bytes, max_pixels: int, mode: str = "RGB", size: tuple[int, int] | None = None) -> np.ndarray:
    """Image bytes -> upright uint8 pixels, height x width x channels (1 channel for mode "L", 3 for "RGB"),
    resized by Pillow (bilinear) to `size` (width, height) when given and different."""
    image = open_image(raw, max_pixels).convert(mode)
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    return np.array(image, dtype=np.uint8).reshape(height, width, len(image.getbands()))


def decode_image(raw: bytes, max_pixels: int, mode: str = "RGB", size: tuple[int, int] | None = None) -> torch.Tensor:
    """decode_pixels as a tensor, channels x height x width."""
    return torch.from_numpy(decode_pixels(raw, max_pixels, mode, size)).permute(2, 0, 1)


def batchable_jpeg(raw: bytes, max_pixels: int) -> bool:
    """Whether decode_jpeg gives the same pixels as Pillow for these bytes: a complete (ends with the EOI marker)
    RGB JPEG without EXIF rotation. Reads only the header; a bad or too large image is refused here."""
    image = image_header(raw, max_pixels)
    if image.format != "JPEG" or image.mode != "RGB" or not raw.rstrip(b"\0").endswith(JPEG_END):
        return False
    try:
        return image.getexif().get(EXIF_ORIENTATION, 1) == 1
    except Exception:  # unreadable EXIF: Pillow's path answers it as in "pil" mode
        return False


def jpeg_data(raw: bytes) -> torch.Tensor:
    """JPEG bytes as the 1-D uint8 CPU tensor decode_jpeg reads."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode_jpegs(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor | Exception]:
    """uint8 RGB 3 x H x W tensors on `device`, one per JPEG, from one batched decode_jpeg call; when that call
    raises, each JPEG is decoded alone and the one that fails gets its exception in its place."""
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # 1.2 s to import: only workers that decode JPEGs pay it

    try:
        return list(decode_jpeg([jpeg_data(raw) for raw in jpegs], mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError) as exc:
        logger.info("the batched JPEG decode of %d images failed (%s): decoding each alone", len(jpegs), exc)
    images: list[torch.Tensor | Exception] = []
    for raw in jpegs:
        try:
            images.append(decode_jpeg(jpeg_data(raw), mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError) as exc:
            images.append(exc)
    return images
