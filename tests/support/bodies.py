"""Request bodies: good and bad images, JSON and KServe documents."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

from PIL import Image

EXIF_ORIENTATION = 0x0112


def png_header_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels in about 50 KB: it decodes to `width * height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_inputs(good_png: bytes) -> dict[str, tuple[bytes, str]]:
    """Each case a body and its content type, all of which must be answered 400 with a JSON error."""
    row = [0.5] * 28
    return {
        "not_an_image": (b"this is not an image at all", "application/octet-stream"),
        "truncated_png": (good_png[: len(good_png) // 2], "image/png"),
        "empty_body": (b"", "application/octet-stream"),
        "png_20000x20000": (png_header_bomb(), "image/png"),
        "json_wrong_shape": (json.dumps({"input": [row] * 27}).encode(), "application/json"),
        "json_ragged": (json.dumps({"input": [row] * 27 + [[0.5]]}).encode(), "application/json"),
        "json_nan": (
            b'{"input": [' + b",".join([json.dumps(row).encode()] * 27) + b", [NaN" + b", 0.5" * 27 + b"]]}",
            "application/json",
        ),
        "json_out_of_range": (json.dumps({"input": [[255.0] * 28] * 28}).encode(), "application/json"),
        "json_strings": (json.dumps({"input": [["a"] * 28] * 28}).encode(), "application/json"),
        "json_wrong_key": (json.dumps({"image": [row] * 28}).encode(), "application/json"),
        "json_empty_inputs": (json.dumps({"inputs": []}).encode(), "application/json"),
        "json_syntax_error": (b'{"input": [[0.1, 0.2', "application/json"),
    }


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rotated_jpeg(png: bytes, orientation: int = 6) -> bytes:
    """The image as a phone writes a portrait photo: pixels stored turned 90 degrees counter-clockwise and
    EXIF Orientation=6 telling viewers to turn them back."""
    image = Image.open(io.BytesIO(png)).convert("L").rotate(90, expand=True)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def malformed(png: bytes) -> list[tuple[str, str, dict, int]]:
    """(protocol, handler, body, status): each must be refused in the protocol's error shape, never with a 5xx."""
    image = {"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64(png)]}
    pixels = {"name": "x", "shape": [1, 27, 28], "datatype": "FP32", "data": [0.0] * 756}
    return [
        ("v1", "digits", {}, 400),
        ("v1", "digits", {"instance": [b64(png)]}, 400),
        ("v1", "digits", {"instances": []}, 400),
        ("v1", "digits", {"instances": [{"data": "%%%not base64%%%"}]}, 400),
        ("v1", "digits", {"instances": [{"b64": b64(b"not an image")}]}, 400),
        ("v1", "digits", {"instances": [{"data": b64(png)}] * 65}, 413),
        ("v1", "digits", {"instances": [{"bytes": b64(png)}]}, 400),
        ("v1", "image", {"instances": [[0.5] * 3]}, 400),
        ("v1", "text", {"instances": [""]}, 400),
        ("v1", "tensor", {"instances": [[[0.5] * 28] * 27]}, 400),
        ("v2", "digits", {}, 400),
        ("v2", "digits", {"input": [image]}, 400),
        ("v2", "digits", {"inputs": []}, 400),
        ("v2", "digits", {"inputs": [{**image, "datatype": "FP32"}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "datatype": "STRING"}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "shape": [2]}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "data": ["%%%"]}]}, 400),
        ("v2", "digits", {"inputs": [{**image, "shape": [65], "data": [b64(png)] * 65}]}, 413),
        ("v2", "digits", {"inputs": [{"name": "images", "datatype": "BYTES", "data": [b64(png)]}]}, 400),
        ("v2", "digits", {"inputs": [image], "outputs": [{"name": "logits"}]}, 400),
        ("v2", "tensor", {"inputs": [image]}, 400),
        ("v2", "tensor", {"inputs": [pixels]}, 400),
        ("v2", "text", {"inputs": [{"name": "t", "shape": [1], "datatype": "INT64", "data": [3]}]}, 400),
    ]


def good_document(protocol: str, name: str, png: bytes) -> dict:
    """One well-formed request to `name` in `protocol`."""
    value = {"text": "a wonderful movie", "tensor": [[[0.0] * 28] * 28]}.get(name, b64(png))
    if protocol == "v1":
        return {"instances": [value]}
    if name == "tensor":
        return {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}
    return {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [value]}]}


def jpeg_bytes(image: Image.Image, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save_options)
    return buffer.getvalue()


def batched_test_images(held_out, count: int = 6) -> list[Image.Image]:
    """Held-out digits as RGB photos of odd sizes: tinted, resized to 50x40 up to 75x60."""
    images = []
    for i, sample in enumerate(held_out[:count]):
        gray = Image.open(sample.path).convert("L").resize((50 + 5 * i, 40 + 4 * i), Image.Resampling.BILINEAR)
        tint = Image.new("RGB", gray.size, (40 * i % 256, 255 - 30 * i, 128))
        images.append(Image.composite(tint, Image.new("RGB", gray.size, (10, 20, 30)), gray))
    return images


def corrupt_jpeg(good: bytes) -> bytes:
    """A JPEG whose header Pillow reads (so batched mode defers it) but whose Huffman tables are garbage."""
    counts = good.index(b"\xff\xc4") + 5  # the first DHT segment's 16 code counts, after its length and class
    return good[:counts] + b"\xff" * 16 + good[counts + 16 :]


def rotated_rgb_jpeg(image: Image.Image) -> bytes:
    """`image` stored as a phone stores a portrait photo: turned 90 degrees, EXIF Orientation=6 to undo it."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return jpeg_bytes(image.rotate(90, expand=True), exif=exif.tobytes())


def malformed_corpus(good_png: bytes) -> list[tuple[str, bytes, str]]:
    """More than 20 ways to get it wrong, each of which must get a 4xx JSON error and never a 5xx."""
    deep = b"[" * 50_000 + b"]" * 50_000
    corpus = [("digits", body, content_type) for body, content_type in bad_inputs(good_png).values()]
    corpus += [
        ("digits", b"hello", "text/plain"),
        ("image", b'{"image": "%%%not-base64%%%"}', "application/json"),
        ("image", b"GIF89a garbage", "image/gif"),
        ("image", png_header_bomb(), "image/png"),
        ("image", b"plain words", "text/plain"),
        ("image", deep, "application/json"),
        ("tensor", struct.pack("<f", float("nan")) * 784, "application/octet-stream"),
        ("tensor", struct.pack("<f", float("inf")) * 784, "application/octet-stream"),
        ("tensor", b"\0" * 1001, "application/octet-stream"),
        ("tensor", json.dumps({"input": [[[True] * 28] * 28]}).encode(), "application/json"),
        ("tensor", json.dumps({"inputs": [[[[0.0] * 28] * 28]] * 65}).encode(), "application/json"),
        ("tensor", b"<xml/>", "application/xml"),
        ("text", b"\xff\xfe\xfd not utf-8", "text/plain"),
        ("text", b"", "text/plain"),
        ("text", ("word " * 400).encode(), "text/plain"),
        ("text", good_png, "image/png"),
        ("text", deep, "application/json"),
        ("text", json.dumps({"texts": []}).encode(), "application/json"),
        ("text", b"\0" * (17 * 1024 * 1024), "text/plain"),  # over TorchServe's max_request_size
    ]
    return corpus


def one_per_class(cases: list, class_of) -> list:
    """The first case of each class (`class_of(case)`): what a live server must show once per kind of error, the
    whole corpus having run in process."""
    seen: set = set()
    kept = []
    for case in cases:
        key = class_of(case)
        if key not in seen:
            seen.add(key)
            kept.append(case)
    return kept
