"""Downloaded weights on node-local disk: fetched once, validated, content-addressed, LRU by bytes.

Every weights file a user names by URL (a single-file checkpoint now, LoRAs and other adapters
next) comes through here:

- fetched through the SSRF guard, streamed to a temporary file under a size cap;
- validated before anything loads it: a safetensors header that parses and whose tensors lie
  inside the file; pickled formats (`.ckpt`, `.bin`, `.pt`: zip or raw pickle) are refused unless
  the operator opts in, because unpickling runs arbitrary code;
- stored under its sha256, so two URLs of the same bytes share one file;
- evicted least-recently-used once the cache exceeds its byte budget;
- fetched once even when many requests ask for the same URL at the same moment.

The URL -> digest index is kept in `index.json` beside the files, so a restarted replica on the
same node finds what earlier ones downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from deployments.common.jobs import JobInputError
from serve_app.url_guard import NetworkPolicy, UrlFetchError, fetch_into

logger = logging.getLogger("diffusion_serve.weights")

SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32", "U64"}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class WeightsFormatError(ValueError):
    """The file is not weights we are willing to load; the message says why and what to do."""

    def __init__(self, msg: str, type: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.type = type


def validate_weights_file(path: Path, allow_pickle: bool = False) -> str:
    """Return the format ("safetensors" or "pickle") or raise WeightsFormatError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)):
            if allow_pickle:
                return "pickle"
            raise WeightsFormatError(
                "this is a pickled checkpoint (.ckpt/.bin/.pt); loading it could run arbitrary code, so this "
                "server only loads .safetensors. Convert it to safetensors, or ask the operator to allow pickles",
                "weights_pickled",
            )
        if len(head) < 8:
            raise WeightsFormatError("the file is too short to be a safetensors file", "weights_invalid")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise WeightsFormatError("the file is not a safetensors file (its header length is impossible)", "weights_invalid")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsFormatError("the file is not a safetensors file (its header is not JSON)", "weights_invalid") from None
    if not isinstance(header, dict):
        raise WeightsFormatError("the file is not a safetensors file (its header is not a table)", "weights_invalid")
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or entry.get("dtype") not in SAFETENSORS_DTYPES
            or not (0 <= offsets[0] <= offsets[1] <= data_bytes)
        ):
            raise WeightsFormatError(f"the safetensors file is damaged (tensor {name!r} lies outside the file)", "weights_invalid")
    return "safetensors"


def file_digest(path: Path) -> str:
    """A weights file's sha256 (cache files are named by it already; others are hashed)."""
    if len(path.stem) == 64 and all(c in "0123456789abcdef" for c in path.stem):
        return path.stem
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_name(path: Path) -> str:
    """A short stable name for a weights file (adapter names), from its digest."""
    return file_digest(path)[:16]


class CacheMetrics:
    """Hits, misses, bytes fetched, fetch seconds and evictions of one weights cache.

    Kept as plain counters (for `stats()`) and, inside a Ray worker, exported through Ray's
    metrics agent to Prometheus (`ray_diffusion_serve_weights_cache_*`).
    """

    FETCH_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800]

    def __init__(self, cache_name: str) -> None:
        self.counts = {"hits": 0, "misses": 0, "bytes_fetched": 0, "evictions": 0, "fetch_seconds": 0.0}
        self._tags = {"cache": cache_name}
        self._ray = None
        try:
            import ray
            from ray.util import metrics

            if ray.is_initialized():
                keys = ("cache",)
                self._ray = {
                    "hits": metrics.Counter("diffusion_serve_weights_cache_hits", "weights served from the cache", keys),
                    "misses": metrics.Counter("diffusion_serve_weights_cache_misses", "weights that had to be fetched", keys),
                    "bytes_fetched": metrics.Counter("diffusion_serve_weights_cache_fetched_bytes", "bytes downloaded", keys),
                    "evictions": metrics.Counter("diffusion_serve_weights_cache_evictions", "files evicted", keys),
                    "fetch_seconds": metrics.Histogram(
                        "diffusion_serve_weights_cache_fetch_seconds", "time to fetch and validate a file", self.FETCH_BUCKETS, keys
                    ),
                }
        except Exception:  # noqa: BLE001 - metrics must never break serving
            self._ray = None

    def count(self, name: str, value: float = 1) -> None:
        self.counts[name] += value
        if self._ray:
            if name == "fetch_seconds":
                self._ray[name].observe(value, tags=self._tags)
            else:
                self._ray[name].inc(value, tags=self._tags)


@dataclass
class _Entry:
    digest: str
    suffix: str
    size: int
    used: float


class WeightsCache:
    def __init__(
        self,
        directory: Path,
        policy: NetworkPolicy,
        max_cache_bytes: int,
        max_file_bytes: int,
        download_timeout_s: float = 3600.0,
        allow_pickle: bool = False,
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.max_cache_bytes = max_cache_bytes
        self.max_file_bytes = max_file_bytes
        self.download_timeout_s = download_timeout_s
        self.allow_pickle = allow_pickle
        self._index_path = self.directory / "index.json"
        self._urls: dict[str, _Entry] = self._load_index()
        self._inflight: dict[str, asyncio.Future[Path]] = {}
        self.downloads = 0  # completed downloads, for metrics and tests
        self.metrics = CacheMetrics(self.directory.name)

    # --- index ---------------------------------------------------------------------------

    def _load_index(self) -> dict[str, _Entry]:
        try:
            raw = json.loads(self._index_path.read_text())
            return {url: _Entry(**entry) for url, entry in raw.items()}
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return {}

    def _save_index(self) -> None:
        # A temporary file of its own: several replicas (processes) may share this directory,
        # and with one fixed name a writer's rename can fail because another's already moved it.
        fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=self._index_path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({url: vars(e) for url, e in self._urls.items()}))
        os.replace(tmp, self._index_path)

    def _path(self, entry: _Entry) -> Path:
        return self.directory / f"{entry.digest}{entry.suffix}"

    def cached(self, url: str) -> Path | None:
        entry = self._urls.get(url)
        if entry is None or not self._path(entry).exists():
            return None
        entry.used = time.time()
        return self._path(entry)

    # --- fetching ------------------------------------------------------------------------

    async def fetch(self, url: str, field: tuple[str | int, ...]) -> Path:
        """The local path of `url`'s validated weights; concurrent callers share one download."""
        path = self.cached(url)
        if path is not None:
            self.metrics.count("hits")
            return path
        if url in self._inflight:
            self.metrics.count("hits")  # someone else is fetching it: no second download
            return await asyncio.shield(self._inflight[url])
        self.metrics.count("misses")
        future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self._inflight[url] = future
        try:
            path = await self._download(url, field)
            future.set_result(path)
            return path
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[url]

    async def _download(self, url: str, field: tuple[str | int, ...]) -> Path:
        fd, tmp_name = tempfile.mkstemp(prefix=".download-", dir=self.directory)
        tmp = Path(tmp_name)
        started = time.monotonic()
        try:
            with os.fdopen(fd, "wb") as sink:
                info = await fetch_into(url, self.policy, self.max_file_bytes, sink, timeout_s=self.download_timeout_s)
        except UrlFetchError as exc:
            tmp.unlink(missing_ok=True)
            raise JobInputError(field, exc.msg, exc.type) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        path = await self._admit(tmp, info.sha256, info.size, url, field, shown=url.split("?")[0])
        self.downloads += 1
        self.metrics.count("bytes_fetched", info.size)
        self.metrics.count("fetch_seconds", time.monotonic() - started)
        logger.info("fetched %s (%d bytes, sha256 %s)", url.split("?")[0], info.size, info.sha256[:12])
        return path

    async def store(self, data: bytes, field: tuple[str | int, ...]) -> Path:
        """Weights given inline (a data: URI): validated and cached like a download."""
        if len(data) > self.max_file_bytes:
            raise JobInputError(field, f"the file is larger than the {self.max_file_bytes // 2**20} MB limit", "url_too_large")
        digest = hashlib.sha256(data).hexdigest()
        key = f"sha256:{digest}"
        path = self.cached(key)
        if path is not None:
            return path
        fd, tmp_name = tempfile.mkstemp(prefix=".inline-", dir=self.directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return await self._admit(Path(tmp_name), digest, len(data), key, field, shown="the inline file")

    def path_of(self, digest: str) -> Path | None:
        """The cached file with this content digest, if this node has it."""
        for suffix in (".safetensors", ".pickle"):
            path = self.directory / f"{digest}{suffix}"
            if path.exists():
                return path
        return None

    def link_in(self, key: str, source: Path, digest: str, size: int) -> Path | None:
        """Register a validated file another cache on this node holds (a hard link: no copy, and
        it outlives that cache's eviction). None when it is gone or on another filesystem."""
        entry = _Entry(digest, source.suffix, size, time.time())
        target = self._path(entry)
        try:
            if not target.exists():
                os.link(source, target)
        except OSError:
            return None
        self._urls[key] = entry
        self._evict(keep=digest)
        self._save_index()
        return target

    def adopt(self, path: Path, field: tuple[str | int, ...]) -> Path:
        """A file another cache already holds (huggingface_hub's): validated, used in place."""
        try:
            validate_weights_file(path, self.allow_pickle)
        except WeightsFormatError as exc:
            raise JobInputError(field, f"{path.name}: {exc.msg}", exc.type) from None
        return path

    async def _admit(self, tmp: Path, digest: str, size: int, key: str, field: tuple, shown: str) -> Path:
        """Validate a finished temporary file and move it to its content address."""
        try:
            kind = await asyncio.to_thread(validate_weights_file, tmp, self.allow_pickle)
        except WeightsFormatError as exc:
            tmp.unlink(missing_ok=True)
            raise JobInputError(field, f"{shown}: {exc.msg}", exc.type) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        entry = _Entry(digest, ".safetensors" if kind == "safetensors" else ".pickle", size, time.time())
        target = self._path(entry)
        if target.exists():
            tmp.unlink()
        else:
            tmp.rename(target)
        self._urls[key] = entry
        self._evict(keep=entry.digest)
        self._save_index()
        return target

    def _evict(self, keep: str) -> None:
        """Drop least-recently-used files until the cache fits its budget (never the newest)."""
        by_digest: dict[str, _Entry] = {}
        for entry in self._urls.values():
            current = by_digest.get(entry.digest)
            if current is None or entry.used > current.used:
                by_digest[entry.digest] = entry
        total = sum(e.size for e in by_digest.values())
        for entry in sorted(by_digest.values(), key=lambda e: e.used):
            if total <= self.max_cache_bytes:
                break
            if entry.digest == keep:
                continue
            self._path(entry).unlink(missing_ok=True)
            self._urls = {u: e for u, e in self._urls.items() if e.digest != entry.digest}
            total -= entry.size
            self.metrics.count("evictions")
            logger.info("evicted %s (%d bytes)", entry.digest[:12], entry.size)


HF_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")


async def resolve_weights_file(path: str, field: tuple, cache: WeightsCache, default_file: str = "pytorch_lora_weights.safetensors") -> Path:
    """A local, validated copy of the adapter weights at `path`: an http(s) URL (civitai-style
    download links too), a `data:` URI, a Hugging Face repo id (its `default_file`), or a file in
    one (`owner/name/file.safetensors`). Local paths are refused: users must not read our disk."""
    if path.startswith(("http://", "https://")):
        return await cache.fetch(path, field)
    if path.startswith("data:"):
        header, _, payload = path.partition(",")
        if ";base64" not in header:
            raise JobInputError(field, "a data: URI for weights must be base64-encoded", "data_uri_invalid")
        try:
            data = base64.b64decode(payload)
        except ValueError:
            raise JobInputError(field, "the data URI is not valid base64", "data_uri_invalid") from None
        return await cache.store(data, field)
    match = HF_FILE.match(path)
    if match and not path.startswith(("/", ".", "~")):
        return await asyncio.to_thread(_from_hub, match.group("repo"), match.group("file") or default_file, field, cache)
    raise JobInputError(
        field, "expected an http(s) URL, a data: URI, or a Hugging Face repo id (owner/name[/file.safetensors])", "weights_path_invalid"
    )


def _from_hub(repo: str, filename: str, field: tuple, cache: WeightsCache) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise JobInputError(field, f"could not fetch {repo}/{filename} from the Hugging Face hub ({type(exc).__name__})", "url_unreachable") from None
    return cache.adopt(Path(local), field)


class WeightsProvider(Protocol):
    """Where replicas get adapter and checkpoint files: `get(source, field) -> local Path`."""

    async def get(self, source: str, field: tuple, default_file: str = "pytorch_lora_weights.safetensors") -> Path: ...


class LocalWeights:
    """Every replica fetches into its node's cache itself (no cluster-wide de-duplication)."""

    def __init__(self, cache: WeightsCache) -> None:
        self.cache = cache

    async def get(self, source: str, field: tuple, default_file: str = "pytorch_lora_weights.safetensors") -> Path:
        return await resolve_weights_file(source, field, self.cache, default_file)
