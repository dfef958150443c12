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
    """A boto3 S3 client for ``AWS_ENDPOINT_URL`` (moto/MinIO) or AWS itself when it is unset."""
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


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
