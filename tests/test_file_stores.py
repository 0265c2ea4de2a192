"""Output stores: names are unguessable and safe; S3 works against an S3 API server.

The S3 tests talk boto3 over HTTP to moto's S3 server (a stand-in for AWS/MinIO, named as such);
the local store is the real one the router serves from.
"""

from __future__ import annotations

import httpx
import pytest

from serve_app.config import FileStoreSettings
from serve_app.files import FILE_NAME, LocalFileStore, S3FileStore, make_output_store
from tests.conftest import free_port


def test_local_store_names_are_random_and_reject_traversal(tmp_path):
    store = LocalFileStore(tmp_path / "files")
    names = {store.save(b"x", "png", "image/png") for _ in range(50)}
    assert len(names) == 50 and all(FILE_NAME.match(n) for n in names)
    name = names.pop()
    assert store.read(name) == b"x"
    assert store.url(name, "http://host:8000") == f"http://host:8000/files/{name}"
    assert store.path("../../etc/passwd") is None and store.read("../secret.png") is None


def test_local_store_recognises_its_own_urls(tmp_path):
    store = LocalFileStore(tmp_path, public_base_url="https://images.example.com")
    name = store.save(b"x", "png", "image/png")
    assert store.name_from_url(f"https://images.example.com/files/{name}", "http://internal:8000") == name
    assert store.name_from_url(f"http://internal:8000/files/{name}", "http://internal:8000") == name
    assert store.name_from_url(f"https://elsewhere.example.com/files/{name}", "http://internal:8000") is None


@pytest.fixture(scope="module")
def s3_endpoint():
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="outputs")
    yield endpoint
    server.stop()


@pytest.fixture()
def s3_settings(s3_endpoint, monkeypatch) -> FileStoreSettings:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return FileStoreSettings(kind="s3", s3_bucket="outputs", s3_endpoint_url=s3_endpoint, s3_region="us-east-1")


def test_s3_store_round_trips_and_presigns(s3_settings):
    store = make_output_store(s3_settings)
    assert isinstance(store, S3FileStore)
    name = store.save(b"\x89PNG fake", "png", "image/png")
    assert store.read(name) == b"\x89PNG fake"
    url = store.url(name, "http://ignored")
    assert "Signature" in url or "X-Amz-Signature" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"\x89PNG fake"
    assert response.headers["content-type"] == "image/png"
    assert store.read("AAAAAAAAAAAAAAAAAAAAAA.png") is None


def test_s3_store_with_a_public_base_url(s3_settings):
    settings = s3_settings.model_copy(update={"s3_public_base_url": "https://cdn.example.com"})
    store = S3FileStore(settings)
    name = store.save(b"x", "jpg", "image/jpeg")
    url = store.url(name, "http://ignored")
    assert url == f"https://cdn.example.com/outputs/{name}"
    assert store.name_from_url(url, "http://ignored") == name


def test_s3_settings_need_a_bucket():
    with pytest.raises(ValueError, match="s3_bucket"):
        FileStoreSettings(kind="s3")
