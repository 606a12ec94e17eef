"""Get the document onto local disk without ever holding it whole in memory."""

from __future__ import annotations

import os
from pathlib import Path

from .contract import BadInput, TempFail

STORE_ROOT = Path(os.environ.get("JOBCELL_STORE_ROOT", "/store"))
_CHUNK = 1024 * 1024


def fetch(uri: str, scratch: Path, max_bytes: int) -> Path:
    """A local path to the document: the read-only store mount as is, or an S3 object streamed to scratch."""
    if uri.startswith("store:"):
        name = uri.removeprefix("store:")
        if "/" in name or name.startswith("."):
            raise BadInput(f"invalid store name {name!r}")
        path = STORE_ROOT / name
        if not path.is_file():
            raise TempFail(f"{uri} is not in the store at {STORE_ROOT} (is the store mounted?)")
        _check_size(path.stat().st_size, max_bytes)
        return path
    if uri.startswith("s3://"):
        return _from_s3(uri, scratch, max_bytes)
    raise BadInput(f"cannot fetch {uri!r}: expected store:NAME or s3://bucket/key")


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise BadInput(f"the file is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:g} MB limit "
                       "(JOBCELL_MAX_INPUT_BYTES)")


def _from_s3(uri: str, scratch: Path, max_bytes: int) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=os.environ.get("JOBCELL_S3_ENDPOINT") or None)
    dest = scratch / "document"
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
        _check_size(int(obj["ContentLength"]), max_bytes)
        written = 0
        with dest.open("wb") as f:
            for chunk in obj["Body"].iter_chunks(_CHUNK):
                written += len(chunk)
                _check_size(written, max_bytes)  # a lying Content-Length cannot fill the disk
                f.write(chunk)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchBucket", "404"):
            raise BadInput(f"{uri} does not exist") from None
        raise TempFail(f"S3 error fetching {uri}: {e}") from None
    except BotoCoreError as e:
        raise TempFail(f"S3 unreachable fetching {uri}: {e}") from None
    return dest
