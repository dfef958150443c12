"""Tests of aot_pipeline/storage.py against moto's S3 server."""

import boto3
import numpy as np
import pytest

from aot_pipeline import storage


def test_multipart_etag_matches_s3(s3_env, tmp_path, monkeypatch):
    """The upload check's predicted ETag is what S3 stores, for one part and for several."""
    monkeypatch.setattr(storage, "PART_SIZE", 5 * 2**20)  # S3's smallest part size
    boto3.client("s3").create_bucket(Bucket="etag")
    for size in (1000, 11 * 2**20):
        path = tmp_path / f"blob-{size}"
        path.write_bytes(np.random.default_rng(size).bytes(size))
        storage.upload_verified(path, f"s3://etag/{path.name}", sha256="x")  # checks the ETag
        etag = storage.multipart_etag(path, storage.PART_SIZE)
        assert etag.endswith("-3") == (size > storage.PART_SIZE)
    monkeypatch.setattr(storage, "multipart_etag", lambda path, part_size: "0" * 32)
    with pytest.raises(OSError, match="does not match"):
        storage.upload_verified(path, f"s3://etag/{path.name}", sha256="x")
