"""Input files (data URIs, http(s) URLs, our own store) and output storage.

Inputs: every `*_url` field accepts a `data:` URI, an http(s) URL (fetched through the SSRF
guard with a size cap), or a URL of our own file store (read directly). Images are decoded here,
in the router, so a bad file is a 422 before any GPU sees it.

Outputs: a local directory served at `GET /files/<name>` (the default), or an S3-compatible
bucket. Names are random (128 bits), so a URL cannot be guessed from another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve_app.config import AppConfig, FileStoreSettings
from serve_app.errors import InputError
from serve_app.schemas.common import Image as ImageOutput
from serve_app.url_guard import UrlFetchError, fetch

FILE_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpg|safetensors)$")
DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


# --- output encoding -----------------------------------------------------------------------

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
# fal saves JPEG at quality 95. PNG level 1 is ~5x faster than the default 6 for ~10% more bytes:
# on the hot path, latency wins.
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 1


@dataclass
class EncodedImage:
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int


def encode_image(pixels: np.ndarray, fmt: str) -> EncodedImage:
    """Encode model output. Runs in the router's threads (PIL's zlib/libjpeg release the GIL)."""
    image = Image.fromarray(pixels, mode="RGB")
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return EncodedImage(buf.getvalue(), CONTENT_TYPES[fmt], "jpg" if fmt == "jpeg" else "png", image.width, image.height)


# --- output storage ------------------------------------------------------------------------


class OutputStore(Protocol):
    def save(self, data: bytes, extension: str, content_type: str) -> str: ...
    def url(self, name: str, base_url: str) -> str: ...
    def read(self, name: str) -> bytes | None: ...
    def name_from_url(self, url: str, base_url: str) -> str | None: ...


def new_file_name(extension: str) -> str:
    return f"{secrets.token_urlsafe(16)}.{extension}"


class LocalFileStore:
    """Files in a local directory, served by the router at /files/<name>."""

    def __init__(self, directory: Path, public_base_url: str | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None

    def path(self, name: str) -> Path | None:
        if not FILE_NAME.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def save(self, data: bytes, extension: str, content_type: str) -> str:
        name = new_file_name(extension)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(self.directory / name)
        return name

    def url(self, name: str, base_url: str) -> str:
        return f"{(self.public_base_url or base_url).rstrip('/')}/files/{name}"

    def read(self, name: str) -> bytes | None:
        path = self.path(name)
        return path.read_bytes() if path else None

    def name_from_url(self, url: str, base_url: str) -> str | None:
        """Our own file's name when `url` points back at this store, else None."""
        for base in filter(None, (self.public_base_url, base_url.rstrip("/"))):
            prefix = f"{base}/files/"
            if url.startswith(prefix) and FILE_NAME.match(url[len(prefix) :]):
                return url[len(prefix) :]
        return None


class S3FileStore:
    """Files in an S3-compatible bucket (AWS, MinIO, R2, ...); URLs are public or presigned."""

    def __init__(self, settings: FileStoreSettings) -> None:
        import boto3  # optional dependency: pip install 'diffusion-serve[s3]'

        self.settings = settings
        self.bucket = settings.s3_bucket
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region)

    def _key(self, name: str) -> str:
        return f"{self.settings.s3_prefix}{name}"

    def save(self, data: bytes, extension: str, content_type: str) -> str:
        name = new_file_name(extension)
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type)
        return name

    def url(self, name: str, base_url: str) -> str:
        if self.settings.s3_public_base_url:
            return f"{self.settings.s3_public_base_url.rstrip('/')}/{self._key(name)}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=self.settings.s3_presign_ttl_s
        )

    def read(self, name: str) -> bytes | None:
        if not FILE_NAME.match(name):
            return None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def name_from_url(self, url: str, base_url: str) -> str | None:
        path = urlsplit(url).path
        marker = f"/{self.settings.s3_prefix}"
        if self.settings.s3_public_base_url and url.startswith(self.settings.s3_public_base_url) and marker in path:
            name = path.rsplit("/", 1)[-1]
            return name if FILE_NAME.match(name) else None
        return None


def make_output_store(settings: FileStoreSettings) -> OutputStore:
    if settings.kind == "s3":
        return S3FileStore(settings)
    return LocalFileStore(settings.directory, settings.public_base_url)


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def publish_images(store: OutputStore, images: list[np.ndarray], image_format: str, sync_mode: bool, base_url: str) -> list[ImageOutput]:
    """Encode generated pixels and hand them out as fal's `Image` objects: stored files with
    unguessable names, or data URIs (`sync_mode`), for every endpoint family alike."""
    published = []
    for pixels in images:
        encoded = encode_image(pixels, image_format)
        if sync_mode:
            url, name = data_uri(encoded.data, encoded.content_type), None
        else:
            name = store.save(encoded.data, encoded.extension, encoded.content_type)
            url = store.url(name, base_url)
        published.append(
            ImageOutput(
                url=url,
                content_type=encoded.content_type,
                file_name=name or f"image.{encoded.extension}",
                file_size=len(encoded.data),
                width=encoded.width,
                height=encoded.height,
            )
        )
    return published


# --- inputs --------------------------------------------------------------------------------


@dataclass
class InputImage:
    pixels: np.ndarray  # HxWxC uint8 (C = 3 for RGB, absent for masks)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]


class InputFiles:
    """Fetches and decodes user-supplied files; every failure is a 422 on the field it came from."""

    def __init__(self, config: AppConfig, store: OutputStore) -> None:
        self.config = config
        self.store = store

    async def read(self, url: str, loc: list[str | int], base_url: str, limit: int | None = None) -> bytes:
        limit = limit or self.config.limits.max_input_image_bytes
        if url.startswith("data:"):
            return self._decode_data_uri(url, loc, limit)
        own = self.store.name_from_url(url, base_url)
        if own is not None:
            data = await asyncio.to_thread(self.store.read, own)
            if data is None:
                raise InputError(loc, f"file {own} is not (or no longer) in this server's store", "file_not_found")
            return data
        if not url.startswith(("http://", "https://")):
            raise InputError(loc, "expected an http(s) URL or a data: URI (e.g. from fal_client.encode_image)", "url_invalid")
        try:
            return (await fetch(url, self.config.network, limit)).content
        except UrlFetchError as exc:
            raise InputError(loc, exc.msg, exc.type) from None

    @staticmethod
    def _decode_data_uri(url: str, loc: list[str | int], limit: int) -> bytes:
        match = DATA_URI.match(url)
        if not match:
            raise InputError(loc, "malformed data URI; expected data:<mime>;base64,<data>", "data_uri_invalid")
        payload = match.group("data")
        if match.group("b64"):
            if len(payload) * 3 // 4 > limit:
                raise InputError(loc, f"file is larger than the {limit // (1024 * 1024)} MB limit", "file_too_large")
            try:
                return base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError):
                raise InputError(loc, "the data URI is not valid base64", "data_uri_invalid") from None
        data = unquote(payload).encode("latin-1", errors="replace")
        if len(data) > limit:
            raise InputError(loc, f"file is larger than the {limit // (1024 * 1024)} MB limit", "file_too_large")
        return data

    def _decode_image(self, data: bytes, loc: list[str | int], mode: str) -> InputImage:
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size  # header only: no pixels decoded yet
                if width * height > self.config.limits.max_input_image_pixels:
                    raise InputError(
                        loc,
                        f"image is {width}x{height}; at most {self.config.limits.max_input_image_pixels} pixels are accepted",
                        "image_too_large",
                    )
                im.load()
                converted = im.convert(mode)
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError, SyntaxError):
            raise InputError(loc, "the file is not a readable image (PNG, JPEG, WebP, ...)", "image_invalid") from None
        return InputImage(np.asarray(converted, dtype=np.uint8).copy())

    async def image(self, url: str, loc: list[str | int], base_url: str, mode: str = "RGB") -> InputImage:
        data = await self.read(url, loc, base_url)
        return await asyncio.to_thread(self._decode_image, data, loc, mode)
