"""S3 access for the pipeline (boto3), configured only by the environment.

Production (AWS S3, MinIO) and the local demo/tests (moto's standalone server) use the same
settings: ``AWS_ENDPOINT_URL`` (unset for AWS), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``.
Credentials are never logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key), with a clear error for anything else."""
    parsed = urlparse(url)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise ValueError(f"not an S3 object URL (want s3://bucket/key): {url!r}")
    return parsed.netloc, key


def s3_client():
    """A boto3 S3 client for ``AWS_ENDPOINT_URL`` (moto/MinIO) or AWS itself when it is unset.

    A new session each time: boto3's default session keeps the first credentials it resolved,
    so a long-lived process would not see keys set or removed later."""
    import boto3

    session = boto3.session.Session()
    return session.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def download_s3(url: str, dest: str | Path) -> Path:
    """Download ``s3://bucket/key`` to ``dest`` (the caller verifies checksums)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_url(url)
    dest = Path(dest)
    try:
        s3_client().download_file(bucket, key, str(dest))
    except (BotoCoreError, ClientError) as error:
        raise ConnectionError(
            f"could not download {url} ({error}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
            "and AWS_ENDPOINT_URL, and that the object exists"
        ) from None
    return dest


PART_SIZE = 8 * 2**20  # multipart threshold and part size, fixed so the ETag can be predicted


def multipart_etag(path: str | Path, part_size: int = PART_SIZE) -> str:
    """The ETag S3 gives an object uploaded from ``path`` in ``part_size`` parts: the MD5 of the
    file when it is one part, else ``md5(concatenated part MD5s)-<parts>``."""
    import hashlib

    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk).digest())
    if len(digests) <= 1:
        return (digests[0] if digests else hashlib.md5(b"").digest()).hex()
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


def upload_verified(path: str | Path, url: str, *, sha256: str) -> None:
    """Upload ``path`` to ``s3://bucket/key`` (boto3 multipart above PART_SIZE) with its SHA-256
    as object metadata, then check the stored object's ETag and size against the local file."""
    from boto3.s3.transfer import TransferConfig

    bucket, key = split_s3_url(url)
    client = s3_client()
    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    extra = {"Metadata": {"sha256": sha256}}
    client.upload_file(str(path), bucket, key, ExtraArgs=extra, Config=config)
    head = client.head_object(Bucket=bucket, Key=key)
    etag, size = head["ETag"].strip('"'), Path(path).stat().st_size
    if etag != multipart_etag(path, PART_SIZE) or head["ContentLength"] != size:
        raise OSError(f"{url}: stored object does not match {path} (ETag {etag}, {size} bytes)")
