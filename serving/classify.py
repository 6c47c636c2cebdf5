"""``POST /v1/classify``: an image file in, the model's top-k class names out (raw text
for a text model: serving/sequence.py; records for a tabular one: serving/tabular.py).

Preprocessing is what the contract records: resize to the input H, W and convert to its
channel count. Normalisation is inside the graph, so the model gets uint8 pixels.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from serving.contract import ImagePreprocessing
from serving.protocol import ProtocolError

# Largest image decoded: a 48-megapixel photo fits; a tiny PNG that claims 20000 x 20000
# pixels (a decompression bomb, 1.2 GB as RGB) is refused from its header, before decoding.
MAX_PIXELS = 50_000_000


def image_bytes(body: bytes, content_type: str) -> bytes:
    """The image file in a raw body or in the first file part of a multipart form."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    boundary = next(
        (
            p.split("=", 1)[1].strip('"')
            for p in content_type.split(";")
            if p.strip().startswith("boundary=")
        ),
        "",
    )
    if not boundary:
        raise ProtocolError("multipart body without a boundary")
    for part in body.split(b"--" + boundary.encode())[1:]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if sep and (b"filename=" in head or b'name="file"' in head or b'name="image"' in head):
            return content.removesuffix(b"\r\n")
    raise ProtocolError("multipart body has no file part (send the image as a 'file' field)")


def preprocess(data: bytes, image: ImagePreprocessing) -> np.ndarray:
    """Decode, convert and resize an image into a [1, C, H, W] uint8 batch."""
    from PIL import Image

    channels, height, width = image.shape
    if channels not in (1, 3):
        raise ProtocolError(f"classify supports 1- or 3-channel models, not {channels}")
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.width * picture.height > MAX_PIXELS:
                raise ProtocolError(
                    f"image of {picture.width} x {picture.height} pixels exceeds the limit of "
                    f"{MAX_PIXELS} pixels"
                )
            picture = picture.convert("RGB" if channels == 3 else "L")
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(picture, dtype=np.uint8)
    except ProtocolError:
        raise
    except Exception as exc:
        # Beyond UnidentifiedImageError and OSError, Pillow's decoders raise SyntaxError,
        # struct.error, IndexError... on crafted files: any failure on these bytes is theirs.
        raise ProtocolError(f"body is not a decodable image (PNG or JPEG): {exc}") from None
    if channels == 1:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])


def probabilities(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """[rows, classes]: the model's probabilities, else the softmax of its logits."""
    if "probabilities" in outputs:
        return outputs["probabilities"]
    logits = outputs["logits"].astype(np.float64)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, class_names: tuple[str, ...], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {
            "index": int(i),
            "class": class_names[i] if i < len(class_names) else str(i),
            # JSON has no NaN: a probability the model could not compute is null.
            "probability": float(probs[i]) if math.isfinite(probs[i]) else None,
        }
        for i in order
    ]


def ranked(
    outputs: dict[str, np.ndarray], class_names: tuple[str, ...], k: int, many: bool
) -> dict[str, Any]:
    """The top-k answer for a request of one row per item: ``{"predictions": [...]}`` for
    one item, ``{"results": [{"predictions": [...]}, ...]}`` when it sent a list."""
    rows = [top_k(row, class_names, k) for row in probabilities(outputs)]
    if many:
        return {"results": [{"predictions": r} for r in rows]}
    return {"predictions": rows[0]}


def parse_top_k(query: str, classes: int) -> int:
    from urllib.parse import parse_qs

    values = parse_qs(query).get("top_k", ["5"])
    try:
        k = int(values[-1])
    except ValueError:
        raise ProtocolError(f"top_k must be a positive integer, not {values[-1]!r}") from None
    if k < 1:
        raise ProtocolError(f"top_k must be a positive integer, not {k}")
    return min(k, classes)
