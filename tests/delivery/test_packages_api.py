"""Package files: streamed, immutable, ETag, HTTP Range (206 / 416); who may download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.delivery.conftest import bearer

pytestmark = pytest.mark.django_db


def url(package, name="model.safetensors"):
    return f"/api/v1/packages/{package.digest}/{name}"


def body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


def blob(package) -> bytes:
    return (Path(package.storage_path) / "model.safetensors").read_bytes()


@pytest.fixture
def device(profile, package, make_device, publish):
    publish(package.variant, profile)
    return make_device(profile)


def test_a_device_downloads_its_package_streamed_and_immutable(client, package, device):
    response = client.get(url(package), **bearer(device["token"]))
    assert response.status_code == 200
    assert response.streaming  # never read whole into memory
    assert response["Cache-Control"] == "public, max-age=31536000, immutable"
    assert response["ETag"] == f'"{package.blob_sha256}"'
    assert response["Accept-Ranges"] == "bytes"
    assert int(response["Content-Length"]) == package.blob_bytes
    assert hashlib.sha256(body(response)).hexdigest() == package.blob_sha256


def test_the_manifest_and_signature_are_served_with_their_own_etags(client, package, device):
    manifest = client.get(url(package, "manifest.json"), **bearer(device["token"]))
    assert manifest.status_code == 200 and manifest["ETag"] == f'"{package.digest}"'
    assert hashlib.sha256(body(manifest)).hexdigest() == package.digest
    signature = client.get(url(package, "manifest.sig"), **bearer(device["token"]))
    assert body(signature) == bytes.fromhex(package.signature)


def test_a_range_gets_206_with_content_range(client, package, device):
    data = blob(package)
    response = client.get(url(package), HTTP_RANGE="bytes=100-1099", **bearer(device["token"]))
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes 100-1099/{package.blob_bytes}"
    assert response["Content-Length"] == "1000"
    assert body(response) == data[100:1100]
    resume = client.get(url(package), HTTP_RANGE="bytes=250000-", **bearer(device["token"]))
    assert resume.status_code == 206 and body(resume) == data[250000:]
    tail = client.get(url(package), HTTP_RANGE="bytes=-10", **bearer(device["token"]))
    assert tail.status_code == 206 and body(tail) == data[-10:]
    beyond_end = client.get(url(package), HTTP_RANGE=f"bytes=10-{10**9}", **bearer(device["token"]))
    assert beyond_end.status_code == 206 and body(beyond_end) == data[10:]


def test_an_unsatisfiable_range_gets_416(client, package, device):
    response = client.get(url(package), HTTP_RANGE=f"bytes={package.blob_bytes}-", **bearer(device["token"]))
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{package.blob_bytes}"


@pytest.mark.parametrize("header", ["bytes=5-2", "items=0-10", "bytes=0-1,5-6", "bytes=x-y"])
def test_a_range_we_do_not_serve_gets_the_whole_file(client, package, device, header):
    response = client.get(url(package), HTTP_RANGE=header, **bearer(device["token"]))
    assert response.status_code == 200 and body(response) == blob(package)


def test_if_range_with_another_version_gets_the_whole_file(client, package, device):
    response = client.get(
        url(package), HTTP_RANGE="bytes=0-9", HTTP_IF_RANGE='"something-else"', **bearer(device["token"])
    )
    assert response.status_code == 200
    same = client.get(
        url(package),
        HTTP_RANGE="bytes=0-9",
        HTTP_IF_RANGE=f'"{package.blob_sha256}"',
        **bearer(device["token"]),
    )
    assert same.status_code == 206


def test_if_none_match_gets_304(client, package, device):
    response = client.get(
        url(package), HTTP_IF_NONE_MATCH=f'"{package.blob_sha256}"', **bearer(device["token"])
    )
    assert response.status_code == 304


def test_a_device_cannot_fetch_a_package_not_released_to_its_profile(
    client, make_profile, package, device, make_device
):
    stranger = make_device(make_profile("Another Phone"))
    assert client.get(url(package), **bearer(stranger["token"])).status_code == 404


def test_people_with_a_role_download_any_package(client, api_as, viewer, outsider, package):
    client.force_login(viewer)
    assert client.get(url(package)).status_code == 200
    client.force_login(outsider)
    assert client.get(url(package)).status_code == 403


def test_script_tokens_download_too(client, viewer, package):
    from accounts.models import ApiToken

    _, raw = ApiToken.issue(viewer, "ci")
    assert client.get(url(package), **bearer(raw)).status_code == 200


def test_anonymous_and_unknown_tokens_get_401(client, package):
    assert client.get(url(package)).status_code == 401
    assert client.get(url(package), **bearer("efd_nope")).status_code == 401


def test_unknown_packages_and_files_are_404(client, viewer, package):
    client.force_login(viewer)
    assert client.get(f"/api/v1/packages/{'0' * 64}/model.safetensors").status_code == 404
    assert client.get(f"/api/v1/packages/{package.digest}/secrets.txt").status_code == 404
    assert client.get(f"/api/v1/packages/{package.digest}/../../settings.py").status_code == 404


def test_package_metadata_for_staff_and_viewers(api_as, viewer, outsider, package):
    listed = api_as(viewer).get("/api/v1/packages/")
    assert listed.status_code == 200 and listed.json()["results"][0]["digest"] == package.digest
    detail = api_as(viewer).get(f"/api/v1/packages/{package.digest}/").json()
    assert detail["blob_bytes"] == package.blob_bytes and detail["manifest"]["format"] == 1
    assert detail["urls"]["blob"] == url(package)
    assert api_as(outsider).get("/api/v1/packages/").status_code == 403


def test_the_signing_key_is_public_and_derived_from_the_seed(client, settings):
    from nacl.signing import SigningKey

    response = client.get("/api/v1/signing-key")
    assert response.status_code == 200
    public = bytes(SigningKey(bytes.fromhex(settings.SIGNING_KEY_HEX)).verify_key).hex()
    assert response.json() == {
        "algorithm": "ed25519",
        "public_key": public,
        "key_id": hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16],
    }
