"""Document stores: a local directory (default) or S3 / MinIO through boto3."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, cast

from .errors import DocumentMissing, SubmitError

STORE_SCHEME = "store:"  # store:<name>: a file in the local store, which only the dispatcher reads
_CHUNK = 1024 * 1024


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _checked(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise SubmitError(f"{path}: is a directory; give the documents in it (e.g. {path.rstrip('/')}/*.pdf)")
    if not p.is_file():
        raise SubmitError(f"{path}: no such file")
    if not os.access(p, os.R_OK):
        raise SubmitError(f"{path}: not readable")
    return p


class LocalStore:
    """Content-addressed files in one directory; the same bytes submitted twice are stored once."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def put(self, path: str) -> tuple[str, int, str]:
        src = _checked(path)
        digest = _digest(src)
        name = digest + src.suffix.lower()[:8]
        dest = self.root / name
        if not dest.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            # copy then rename, so a job never sees half a file
            with tempfile.NamedTemporaryFile(dir=self.root, delete=False) as tmp, src.open("rb") as f:
                shutil.copyfileobj(f, tmp, _CHUNK)
            os.chmod(tmp.name, 0o600)  # the dispatcher's alone: a cell is handed its one document
            os.replace(tmp.name, dest)
        return STORE_SCHEME + name, src.stat().st_size, "sha256:" + digest

    def open(self, uri: str) -> tuple[BinaryIO, int]:
        name = uri.removeprefix(STORE_SCHEME)
        if not uri.startswith(STORE_SCHEME) or "/" in name or name.startswith("."):
            raise SubmitError(f"{uri}: not a document of the local store")
        try:
            f = (self.root / name).open("rb")
        except FileNotFoundError:
            raise DocumentMissing(f"{uri} does not exist in the store") from None
        return f, os.fstat(f.fileno()).st_size

    def delete(self, uri: str) -> None:
        name = uri.removeprefix(STORE_SCHEME)
        if uri.startswith(STORE_SCHEME) and "/" not in name and not name.startswith("."):
            (self.root / name).unlink(missing_ok=True)

    def presign(self, uri: str, ttl_s: int) -> str:
        raise SubmitError(f"{uri}: the local store cannot hand out URLs; runtimes without stdin need S3 "
                          "(set JOBCELL_S3_BUCKET)")

    def stat(self, uri: str) -> tuple[int, str]:
        raise SubmitError(f"{uri}: the local store only takes local files; configure JOBCELL_S3_BUCKET for s3://")


class S3Store:
    """Documents in an S3 bucket (or any S3-compatible endpoint such as MinIO)."""

    def __init__(self, bucket: str, prefix: str = "documents/", endpoint_url: str | None = None,
                 client: Any | None = None) -> None:
        import boto3  # imported here: the local store must not need it

        self.bucket = bucket
        self.prefix = prefix
        from botocore.config import Config

        # SigV4: presigned URLs that carry their expiry (X-Amz-Expires), as every current region requires
        self.s3 = client or boto3.client("s3", endpoint_url=endpoint_url, config=Config(signature_version="s3v4"))

    def put(self, path: str) -> tuple[str, int, str]:
        src = _checked(path)
        digest = _digest(src)
        key = f"{self.prefix}{digest}{src.suffix.lower()[:8]}"
        self.s3.upload_file(str(src), self.bucket, key)
        return f"s3://{self.bucket}/{key}", src.stat().st_size, "sha256:" + digest

    def open(self, uri: str) -> tuple[BinaryIO, int]:
        bucket, key = _split(uri)
        try:
            obj = self.s3.get_object(Bucket=bucket, Key=key)
        except self.s3.exceptions.NoSuchKey:
            raise DocumentMissing(f"{uri} does not exist") from None
        except self.s3.exceptions.NoSuchBucket:
            raise DocumentMissing(f"{uri} does not exist (no such bucket)") from None
        return cast(BinaryIO, obj["Body"]), int(obj["ContentLength"])

    def delete(self, uri: str) -> None:
        bucket, key = _split(uri)
        if bucket == self.bucket and key.startswith(self.prefix):  # only what we stored, never a user's object
            self.s3.delete_object(Bucket=bucket, Key=key)

    def presign(self, uri: str, ttl_s: int) -> str:
        bucket, key = _split(uri)
        return str(self.s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=ttl_s))

    def stat(self, uri: str) -> tuple[int, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise SubmitError(f"{uri}: expected s3://bucket/key")
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except Exception as e:  # botocore raises many types; all mean the same to the user
            raise SubmitError(f"{uri}: cannot read it ({e})") from None
        return int(head["ContentLength"]), f"{uri}@{head.get('ETag', '').strip(chr(34))}"


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise SubmitError(f"{uri}: expected s3://bucket/key")
    return bucket, key
