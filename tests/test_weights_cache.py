"""Weights named by URL: fetched once through the SSRF guard, validated, cached by content."""

from __future__ import annotations

import asyncio
import io
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save

from deployments.common.jobs import JobInputError
from deployments.common.weights_cache import WeightsCache, WeightsFormatError, validate_weights_file
from serve_app.url_guard import NetworkPolicy
from tests.conftest import IMAGE_HOST


def _with_header(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


POLICY = NetworkPolicy(allowed_networks=[f"{IMAGE_HOST}/32"], timeout_s=5)


def tensors(seed: int, n: int = 4) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save({f"w{i}": torch.randn(64, 64, generator=g) for i in range(n)})


def make_cache(tmp_path, **kw) -> WeightsCache:
    args = dict(max_cache_bytes=10 * 1024 * 1024, max_file_bytes=1024 * 1024)
    args.update(kw)
    return WeightsCache(tmp_path / "weights", POLICY, **args)


def test_validation_accepts_safetensors_and_refuses_pickles(tmp_path):
    good = tmp_path / "good.safetensors"
    good.write_bytes(tensors(0))
    assert validate_weights_file(good) == "safetensors"

    raw_pickle = tmp_path / "model.ckpt"
    raw_pickle.write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))
    torch_zip = tmp_path / "model.bin"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}))
    torch_zip.write_bytes(buf.getvalue())
    for path in (raw_pickle, torch_zip):
        with pytest.raises(WeightsFormatError) as err:
            validate_weights_file(path)
        assert err.value.type == "weights_pickled" and "safetensors" in err.value.msg
        assert validate_weights_file(path, allow_pickle=True) == "pickle"


@pytest.mark.parametrize(
    "content, why",
    [
        (b"<html>not weights</html>", "header"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", "not JSON"),
        (_with_header(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,9999]}}', b"\0" * 16), "outside"),
    ],
)
def test_validation_refuses_damaged_or_foreign_files(tmp_path, content, why):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError, match=why):
        validate_weights_file(path)


async def test_concurrent_requests_for_a_new_url_download_once(tmp_path, image_server):
    url = image_server.add("/weights/once.safetensors", tensors(1), "application/octet-stream")
    cache = make_cache(tmp_path)
    paths = await asyncio.gather(*(cache.fetch(url, ("model_name",)) for _ in range(16)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == tensors(1)
    assert image_server.hits["/weights/once.safetensors"] == 1 and cache.downloads == 1
    assert paths[0].name.endswith(".safetensors") and len(paths[0].stem) == 64  # sha256 name


async def test_the_index_survives_a_restart(tmp_path, image_server):
    url = image_server.add("/weights/restart.safetensors", tensors(2), "application/octet-stream")
    first = await make_cache(tmp_path).fetch(url, ("model_name",))
    again = await make_cache(tmp_path).fetch(url, ("model_name",))  # a new replica on the same node
    assert first == again and image_server.hits["/weights/restart.safetensors"] == 1


async def test_same_bytes_under_two_urls_share_one_file(tmp_path, image_server):
    a = image_server.add("/weights/a.safetensors", tensors(3), "application/octet-stream")
    b = image_server.add("/weights/b.safetensors", tensors(3), "application/octet-stream")
    cache = make_cache(tmp_path)
    assert await cache.fetch(a, ("x",)) == await cache.fetch(b, ("x",))


async def test_least_recently_used_files_are_evicted_by_bytes(tmp_path, image_server):
    size = len(tensors(10))
    cache = make_cache(tmp_path, max_cache_bytes=int(2.5 * size))
    urls = [image_server.add(f"/weights/lru{i}.safetensors", tensors(10 + i), "application/octet-stream") for i in range(3)]
    p0 = await cache.fetch(urls[0], ("x",))
    await cache.fetch(urls[1], ("x",))
    await cache.fetch(urls[0], ("x",))  # touch 0: 1 is now the least recently used
    await cache.fetch(urls[2], ("x",))
    assert p0.exists() and cache.cached(urls[1]) is None
    await cache.fetch(urls[1], ("x",))  # fetched again after eviction
    assert image_server.hits["/weights/lru1.safetensors"] == 2


@pytest.mark.parametrize(
    "path, body, type_",
    [
        ("/weights/pickled.ckpt", pickle.dumps({"a": 1}, protocol=4), "weights_pickled"),
        ("/weights/page.safetensors", b"<html>login required</html>", "weights_invalid"),
        ("/weights/huge.safetensors", b"\0" * (2 * 1024 * 1024), "url_too_large"),
    ],
)
async def test_bad_files_are_refused_with_the_field_named(tmp_path, image_server, path, body, type_):
    url = image_server.add(path, body, "application/octet-stream")
    cache = make_cache(tmp_path)
    with pytest.raises(JobInputError) as err:
        await cache.fetch(url, ("loras", 1, "path"))
    assert err.value.field == ("loras", 1, "path") and err.value.type == type_
    assert not [p for p in (tmp_path / "weights").iterdir() if p.name != "index.json"]  # nothing left behind


async def test_forbidden_and_missing_urls(tmp_path, image_server):
    cache = make_cache(tmp_path)
    with pytest.raises(JobInputError) as err:
        await cache.fetch("http://169.254.169.254/latest/meta-data/", ("model_name",))
    assert err.value.type == "url_forbidden"
    with pytest.raises(JobInputError) as err:
        await cache.fetch(f"http://{IMAGE_HOST}:{image_server.port}/weights/missing.safetensors", ("model_name",))
    assert err.value.type == "url_http_error" and "404" in err.value.msg


async def test_the_cache_counts_hits_misses_bytes_and_evictions(tmp_path, image_server):
    size = len(tensors(20))
    cache = make_cache(tmp_path, max_cache_bytes=int(1.5 * size))
    a = image_server.add("/weights/metrics-a.safetensors", tensors(20), "application/octet-stream")
    b = image_server.add("/weights/metrics-b.safetensors", tensors(21), "application/octet-stream")
    await cache.fetch(a, ("x",))
    await cache.fetch(a, ("x",))
    await cache.fetch(b, ("x",))  # evicts a
    counts = cache.metrics.counts
    assert (counts["misses"], counts["hits"], counts["evictions"]) == (2, 1, 1)
    assert counts["bytes_fetched"] == 2 * size and counts["fetch_seconds"] > 0
