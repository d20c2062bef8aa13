"""Image and label codecs: the one image decoder, lossless label PNGs, and the encoding of every other field.

Fields are decoded here rather than by WebDataset's decoders, which convert image modes (a uint16 or palette label
PNG would come back wrong): label maps (:func:`~emerdiff_pl.fields.is_label_field`) are read exactly as stored,
other images become H×W×3 uint8 RGB whatever their mode, EXIF orientation applied.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Collection
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from emerdiff_pl.fields import IMAGE_EXTENSIONS, image_field_name, is_label_field

# Decompression-bomb guard of every image decode: 40 Mpx (a 36-megapixel camera frame fits, a 45-megapixel one does
# not). Decoding, resizing and full-size labels of one 40 Mpx image peak at 0.75 GiB of host memory (BENCHMARKS.md);
# overlays and the batches in flight in dataloader workers come on top. PIL's own limit, 89.5 Mpx, is far above.
DEFAULT_MAX_PIXELS = 40_000_000
# JPEG cannot store a side longer than this (Pillow raises "broken data stream" beyond it).
JPEG_MAX_SIDE = 65500
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageDecodeError(ValueError):
    """An input that cannot become an RGB image; its message is the ``reason`` recorded in the failures."""


# --------------------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------------------


def image_field(fields: dict[str, bytes]) -> bytes:
    """The bytes of a sample's input image (the field :func:`~emerdiff_pl.fields.image_field_name` picks);
    raises :class:`ImageDecodeError` when the sample has none."""
    name = image_field_name(fields)
    if name is None:
        raise ImageDecodeError(
            f"sample has no image member (fields: {sorted(fields)}; expected one of {IMAGE_EXTENSIONS})"
        )
    return fields[name]


def _sixteen_bit_to_uint8(image: Image.Image) -> np.ndarray:
    array = np.asarray(image).astype(np.float64)
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0
    elif image.mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def to_rgb(image: Image.Image) -> np.ndarray:
    """H×W×3 uint8 RGB from any PIL mode: 16-bit and float greyscale are rescaled (not clipped), transparency
    is composited over white, CMYK / YCbCr / palette / 1-bit are converted."""
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        return _sixteen_bit_to_uint8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → H×W×3 uint8 RGB, EXIF orientation applied, alpha composited over white (the one image
    decoder). Raises :class:`ImageDecodeError` with the reason for empty, unidentifiable, truncated, corrupt,
    zero-size and oversized (decompression bomb, more than ``max_pixels``) inputs."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}×{height} = {width * height} pixels > max_pixels={max_pixels} "
                    "(possible decompression bomb; raise data.max_pixels if it is genuine)"
                )
            if width == 0 or height == 0:
                raise ImageDecodeError(f"image has zero size ({width}×{height})")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (PIL cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image too large (decompression bomb check: {err})") from None
    except Exception as err:  # truncated / corrupt data raise OSError, SyntaxError, ValueError, ...
        raise ImageDecodeError(f"cannot decode image ({type(err).__name__}: {err})") from None
    with contextlib.suppress(Exception):  # a broken EXIF block must not cost the image: keep it unrotated
        image = ImageOps.exif_transpose(image)
    try:
        return to_rgb(image)
    except Exception as err:
        raise ImageDecodeError(
            f"cannot convert mode {image.mode!r} to RGB ({type(err).__name__}: {err})"
        ) from None


def read_label_png(data: bytes) -> np.ndarray:
    """Decode a label PNG exactly as stored: uint8 for 8-bit (L or palette indices), uint16 for 16-bit."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.uint16).copy()
        if im.mode == "I":  # some writers store 16-bit greyscale as mode I
            arr = np.asarray(im)
            if arr.min() >= 0 and arr.max() <= 65535:
                return arr.astype(np.uint16)
            return arr.astype(np.int32)
        if im.mode in ("L", "P", "1"):
            return np.asarray(im, dtype=np.uint8).copy()
        return np.asarray(im).copy()  # RGB / RGBA PNG: returned as stored, H×W×C


def encode_label_png(labels: np.ndarray) -> bytes:
    """Encode an H×W integer label map losslessly: 8-bit PNG when max ≤ 255, else 16-bit PNG."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"label map must be 2-D (H×W), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"label map holds negative ids (min {labels.min()}); PNG labels must be ≥ 0")
    top = int(labels.max()) if labels.size else 0
    if top > 65535:
        raise ValueError(f"label id {top} does not fit a 16-bit PNG (max 65535)")
    buf = io.BytesIO()
    if top <= 255:
        Image.fromarray(labels.astype(np.uint8)).save(buf, format="PNG")
    else:
        Image.fromarray(labels.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 RGB image as JPEG, downscaled to fit JPEG's 65500-pixel side limit."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if max(picture.size) > JPEG_MAX_SIDE:
        scale = JPEG_MAX_SIDE / max(picture.size)
        size = (max(1, int(picture.width * scale)), max(1, int(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (no pickled objects)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_json(obj: Any) -> bytes:
    """A JSON-able object as UTF-8 JSON, keys in insertion order."""
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


def decode_field(field: str, data: bytes, as_label: bool = False) -> Any:
    """Decode one field: label maps (:func:`is_label_field`, or ``as_label``) raw, other images to RGB with
    :func:`decode_image`, ``npy`` → numpy, ``json`` → dict, ``txt``/``cls`` → str, anything else → bytes."""
    ext = field.rsplit(".", 1)[-1].lower()
    if as_label or is_label_field(field):
        return read_label_png(data)
    if ext in IMAGE_EXTENSIONS:
        return decode_image(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "json":
        return json.loads(data.decode("utf-8"))
    if ext in ("txt", "cls"):
        return data.decode("utf-8")
    return data


def encode_field(field: str, value: Any) -> bytes:
    """Inverse of :func:`decode_field` for numpy arrays / dicts; bytes pass through unchanged."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    ext = field.rsplit(".", 1)[-1].lower()
    if ext == "npy":
        return encode_npy(value)
    if ext == "json":
        return encode_json(value)
    if ext == "png" and np.asarray(value).ndim == 2:
        return encode_label_png(value)
    if ext == "png":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(value, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if ext in ("jpg", "jpeg"):
        return encode_jpeg(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"cannot encode field {field!r} from {type(value).__name__}")


def decode_sample(raw: dict[str, Any], labels: Collection[str] = ()) -> dict[str, Any]:
    """Decode every field of a raw sample (see :func:`decode_field`); errors name the field, key and shard."""
    sample = {k: v for k, v in raw.items() if k.startswith("__")}
    for field, value in raw.items():
        if field.startswith("__"):
            continue
        try:
            sample[field] = decode_field(field, value, as_label=field in labels)
        except Exception as err:
            raise ValueError(
                f"cannot decode field {field!r} of sample {raw.get('__key__')!r} in {raw.get('__url__')!r}: {err}"
            ) from err
    return sample


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "JPEG_MAX_SIDE",
    "ImageDecodeError",
    "decode_field",
    "decode_image",
    "decode_sample",
    "encode_field",
    "encode_jpeg",
    "encode_json",
    "encode_label_png",
    "encode_npy",
    "image_field",
    "read_label_png",
    "to_rgb",
]
