"""`biva-fetch s3://bucket/prefix DEST`: a published model repository (biva-publish) into the folder DEST.

It reads the manifest `prefix/biva-repository.json` (biva_core/storage.py), downloads every file of the version it
names, checks each one's size and sha256, recreates the zero-byte files it lists whether or not the store has
their objects (KServe's storage initializer skips zero-byte objects), and restores every file's mode (S3 keeps
none). Nothing lands in DEST until every file has been checked:

- DEST missing: the files go into a folder beside it, which is renamed to DEST (one step);
- DEST an existing folder (a Kubernetes emptyDir is a mount point, which cannot be renamed over): the files go into
  a hidden folder inside it; then a marker `.biva-fetch-incomplete` is written, the previous fetch (if any) is
  removed, the files are moved in, the manifest is copied to DEST/biva-repository.json and the marker removed. A
  crash at any point leaves either no repository, the previous one, or the marker, which the next fetch clears.

DEST/biva-repository.json is what marks a complete fetch; a DEST that already holds this version, intact, is left
as it is. A DEST holding anything else is refused, never overwritten.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

from biva_core.storage import (MANIFEST, StorageError, check_manifest, client, explain, key, manifest_bytes,
                               parse_url, safe_relative, sha256_file, storage_exceptions)

INCOMPLETE = ".biva-fetch-incomplete"
_STAGING = ".biva-fetch-"
_WORKERS = 8


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def read_manifest(s3, url: str, bucket: str, prefix: str) -> dict:
    where = f"s3://{bucket}/{key(prefix, MANIFEST)}"
    try:
        body = s3.get_object(Bucket=bucket, Key=key(prefix, MANIFEST))["Body"].read()
    except Exception as e:
        if _code(e) in ("NoSuchKey", "404"):
            raise StorageError(f"{url}: no manifest {where}: nothing is published there, or its publish has not "
                               "finished; expected a repository published with biva-publish") from None
        raise
    try:
        data = json.loads(body)
    except ValueError as e:
        raise StorageError(f"{where} is not JSON ({e}); publish the repository again") from None
    return check_manifest(data, where)


def _download(s3, url: str, bucket: str, base: str, rel: str, entry: dict, root: Path) -> None:
    target = root / safe_relative(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    if entry["size"] == 0:
        target.write_bytes(b"")  # recreated from the manifest: the store may lack zero-byte objects
    else:
        try:
            s3.download_file(bucket, key(base, rel), str(target))
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                raise StorageError(f"{url}: {rel} is listed in the manifest but s3://{bucket}/{key(base, rel)} is "
                                   "missing; the published repository is damaged or was pruned: publish it again"
                                   ) from None
            raise
    size, digest = target.stat().st_size, sha256_file(target)
    if size != entry["size"] or digest != entry["sha256"]:
        raise StorageError(f"{url}: {rel} does not match the manifest (size {size}, sha256 {digest[:12]}...; "
                           f"expected size {entry['size']}, sha256 {entry['sha256'][:12]}...): the published "
                           "repository was altered after publishing; publish it again")
    os.chmod(target, entry["mode"] & 0o777)


def _intact(dest: Path, manifest: dict) -> bool:
    """DEST holds a complete fetch of exactly this manifest's version, every file unchanged."""
    try:
        local = json.loads((dest / MANIFEST).read_text())
        if local.get("version") != manifest["version"] or (dest / INCOMPLETE).exists():
            return False
        for rel, e in manifest["files"].items():
            p = dest / rel
            st = p.stat()
            if st.st_size != e["size"] or (st.st_mode & 0o777) != e["mode"] or sha256_file(p) != e["sha256"]:
                return False
        return True
    except (OSError, ValueError, AttributeError):
        return False


def _ours(entries: list[Path]) -> bool:
    """Everything in DEST is what a biva-fetch put there (a complete fetch, or one that crashed)."""
    names = {p.name for p in entries}
    return not names or MANIFEST in names or INCOMPLETE in names


def _clear(dest: Path, keep: Path) -> None:
    for p in dest.iterdir():
        if p == keep or p.name == INCOMPLETE:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def fetch(url: str, dest: Path, *, log: Callable[[str], object] = lambda *_: None) -> Path:
    """Download the repository published at `url` into `dest` (see the module's doc); returns `dest`.

    Raises StorageError (one line) for a bad URL, a missing bucket or manifest, missing credentials, a file that does
    not match the manifest, or a DEST holding something else; DEST then holds no new (or partial) repository."""
    dest = Path(dest).absolute()
    bucket, prefix = parse_url(url)
    if dest.exists() and not dest.is_dir():
        raise StorageError(f"{dest} is a file; expected DEST to be a folder (empty, or one biva-fetch wrote) or "
                           "not to exist")
    try:
        s3 = client()
        manifest = read_manifest(s3, url, bucket, prefix)
        if dest.is_dir():
            for stale in dest.glob(_STAGING + "*"):  # a fetch into this folder that crashed while downloading
                shutil.rmtree(stale, ignore_errors=True)
            entries = list(dest.iterdir())
            if not _ours(entries):
                raise StorageError(f"{dest} is not empty and holds no repository fetched by biva-fetch (no "
                                   f"{MANIFEST}); expected an empty folder, one biva-fetch wrote, or a new path")
            if _intact(dest, manifest):
                log(f"{dest} already holds version {manifest['version']} of {url}")
                return dest
            staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=dest))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_STAGING}", dir=dest.parent))
        try:
            base = key(prefix, manifest["version"])
            with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
                jobs = [pool.submit(_download, s3, url, bucket, base, rel, e, staging)
                        for rel, e in sorted(manifest["files"].items())]
                for job in jobs:
                    job.result()
            if dest.is_dir():
                (dest / INCOMPLETE).write_text(f"biva-fetch {url} version {manifest['version']} being moved in\n")
                _clear(dest, keep=staging)
                for p in staging.iterdir():
                    os.rename(p, dest / p.name)
                (dest / MANIFEST).write_bytes(manifest_bytes(manifest))
                os.rmdir(staging)
                (dest / INCOMPLETE).unlink()
            else:
                (staging / MANIFEST).write_bytes(manifest_bytes(manifest))
                os.chmod(staging, 0o755)  # mkdtemp's 0o700 is not what a model repository folder should be
                os.rename(staging, dest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except storage_exceptions() as e:
        raise explain(e, url, bucket) from None
    n = len(manifest["files"])
    log(f"fetched version {manifest['version']} of {url} into {dest} ({n} files)")
    return dest


def cache_dir(url: str) -> Path:
    """Where `tritonserver --model-repository s3://...` keeps its local copy: $BIVA_REPOSITORY_CACHE, else
    ~/.cache/biva-serving/repositories/, one folder per URL."""
    root = os.environ.get("BIVA_REPOSITORY_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biva-serving" / "repositories"
    bucket, prefix = parse_url(url)
    tag = hashlib.sha256(f"{bucket}/{prefix}".encode()).hexdigest()[:12]
    return Path(root) / f"{bucket}-{tag}"


def main(argv: list[str] | None = None) -> None:
    """`biva-fetch URL DEST [--debug]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="biva-fetch", description="Fetch a model repository published with "
                                     "biva-publish (s3://BUCKET/PREFIX) into DEST, checked against its manifest. "
                                     "AWS_ENDPOINT_URL, AWS credentials and region come from the environment.")
    parser.add_argument("url", help="s3://BUCKET/PREFIX")
    parser.add_argument("dest", type=Path, help="folder to fill (missing, empty, or one biva-fetch wrote)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        fetch(args.url, args.dest, log=print)
    except StorageError as e:
        if args.debug:
            raise
        print(f"biva-fetch: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
