"""The model repository in object storage (S3): the URL, the manifest and the client that biva-publish writes with
and biva-fetch (and `tritonserver --model-repository s3://...`) read with. Written once here, at the bottom of the
project, so the publisher (export/publish.py) and the fetcher (serving/fetch.py) share one format.

Layout under s3://BUCKET/PREFIX:

    PREFIX/biva-repository.json        the manifest, written LAST; it names the version a reader takes
    PREFIX/<version>/<relative path>   every file of one published repository (version: its content hash)

A version's files are immutable once the manifest names them, so a republish uploads a new version beside the old
one and then replaces the manifest in one PUT: a reader sees the old repository or the new one, never a mix. The
manifest lists every relative path with its size, sha256 and file mode (S3 keeps no modes; Triton users lose
model files' mode bits through it, server#3227), and zero-byte files too (KServe's storage initializer skips
zero-byte objects: the fetcher recreates them from the manifest). No manifest: nothing is published.

boto3 finds the endpoint (AWS_ENDPOINT_URL), credentials and region in the environment as the AWS CLI does.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

MANIFEST = "biva-repository.json"
FORMAT = "biva-repository/1"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHUNK = 1 << 20


class StorageError(Exception):
    """A one-line complaint about the URL, the store, the credentials or what is (not) published there."""


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at either end)."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise StorageError(f"{url!r} is not an S3 URL; expected s3://BUCKET/PREFIX (e.g. s3://biva-models/ood28)")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise StorageError(f"{url}: {bucket!r} is not a valid bucket name; expected s3://BUCKET/PREFIX with a "
                           "bucket of 3-63 lower-case letters, digits, dots or hyphens")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StorageError(f"{url}: the prefix {prefix!r} has an empty, '.' or '..' part; expected s3://BUCKET/PREFIX")
    return bucket, prefix


def key(prefix: str, *parts: str) -> str:
    return "/".join(p for p in (prefix, *parts) if p)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_version(files: dict[str, dict]) -> str:
    """The version name of a set of files: a hash over every path, size, sha256 and mode (16 hex digits)."""
    lines = "".join(f"{p}\0{e['size']}\0{e['sha256']}\0{e['mode']:o}\n" for p, e in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def safe_relative(path: str) -> PurePosixPath:
    """A manifest's path, refused when it could leave the destination folder."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise StorageError(f"the manifest lists the path {path!r}; expected a relative path inside the repository")
    return p


def check_manifest(data: object, where: str) -> dict:
    """The parsed manifest, checked for the fields a reader relies on."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StorageError(f"{where} is not a {FORMAT} manifest (format {got!r}); publish the repository again "
                           "with biva-publish")
    files, version = data.get("files"), data.get("version")
    if not isinstance(files, dict) or not files or not isinstance(version, str) or not version:
        raise StorageError(f"{where}: the manifest names no version or no files; publish the repository again")
    for path, entry in files.items():
        safe_relative(path)
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and isinstance(entry.get("mode"), int)):
            raise StorageError(f"{where}: the entry of {path!r} lacks size, sha256 or mode")
    if content_version(files) != version:
        raise StorageError(f"{where}: version {version} does not match its file list (hash "
                           f"{content_version(files)}); publish the repository again")
    return data


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def client():
    """An S3 client from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., AWS_DEFAULT_REGION)."""
    try:
        import boto3
    except ImportError:
        raise StorageError("boto3 is not installed; expected it with the project: pip install boto3") from None
    return boto3.session.Session().client("s3")  # a fresh session: the environment as it is now


def explain(exc: BaseException, url: str, bucket: str) -> StorageError:
    """boto3's exception as one line naming what was wrong and what was expected."""
    import botocore.exceptions as be

    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
        return StorageError(f"{url}: no AWS credentials found; expected AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or a profile or role) in the environment")
    if isinstance(exc, be.EndpointConnectionError):
        return StorageError(f"{url}: cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url', '')}; "
                            "expected a reachable AWS_ENDPOINT_URL (or AWS itself when it is unset)")
    if isinstance(exc, be.NoRegionError):
        return StorageError(f"{url}: no AWS region; expected AWS_DEFAULT_REGION in the environment")
    if isinstance(exc, be.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return StorageError(f"{url}: the bucket {bucket!r} does not exist at this endpoint; expected an existing "
                                "bucket (create it first)")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{url}: access denied ({code}); expected credentials allowed to read and write "
                                f"s3://{bucket}")
        return StorageError(f"{url}: S3 error {code}: {exc.response.get('Error', {}).get('Message', exc)}")
    if isinstance(exc, be.BotoCoreError):
        return StorageError(f"{url}: {type(exc).__name__}: {exc}")
    return StorageError(f"{url}: {type(exc).__name__}: {exc}")


def storage_exceptions() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as be

    return (StorageError, be.BotoCoreError, be.ClientError)
