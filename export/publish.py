"""`biva-publish REPO s3://bucket/prefix` (and `biva-export --publish URL`): a validated model repository into S3.

Every file goes under `prefix/<version>/` (version: the hash of the files' paths, sizes, sha256 and modes), then
the manifest `prefix/biva-repository.json` is written LAST, in one PUT (biva_core/storage.py has the layout). So
nothing is ever half-published: until the manifest names a version a reader takes the previous one (or finds no
manifest and refuses), and a republish never touches the files of the version readers are fetching. Old versions
are kept; `--prune` deletes all but the new one and the one it replaced (a reader that read the previous manifest
just before the switch can still finish its download).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Callable

import click

from biva_core.contract import REPORT, read_meta
from biva_core.storage import (FORMAT, MANIFEST, StorageError, check_manifest, client, content_version, explain, key,
                               manifest_bytes, parse_url, sha256_file, storage_exceptions)

_VERSION = re.compile(r"^[0-9a-f]{16}$")
_SKIPPED_DIRS = ("__pycache__",)  # what a local Triton run may have left in the model folders: not the export's


def _report_identity(repo: Path) -> dict:
    """The export report's identity; refuses a folder biva-export did not write or did not validate."""
    path = repo / REPORT
    if not repo.is_dir():
        raise StorageError(f"{repo} is not a folder; expected a model repository written by biva-export")
    try:
        report = json.loads(path.read_text())
        identity = {"checkpoint": report["checkpoint"], "checkpoint_sha256": read_meta(repo).checkpoint_sha256,
                    "serving": report["serving"], "validated": report["validated"]}
    except FileNotFoundError:
        raise StorageError(f"{repo} has no {REPORT}; expected a repository written and validated by biva-export "
                           "(biva-export --ckpt MODEL.pt --out DIR)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{path} is not an export report of biva-export ({type(e).__name__}: {e}); "
                           "export the repository again") from None
    if identity["validated"] is not True:
        raise StorageError(f"{repo} was exported with --no-validate; expected a validated repository "
                           "(export it again without --no-validate)")
    return identity


def repository_files(repo: Path) -> dict[str, dict]:
    """Every file under `repo` by relative POSIX path: size, sha256 and permission bits."""
    files: dict[str, dict] = {}
    for root, dirs, names in os.walk(repo):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
        for name in sorted(names):
            p = Path(root) / name
            st = p.lstat()
            rel = p.relative_to(repo).as_posix()
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{p} is not a regular file (a link or a device); expected plain files only")
            files[rel] = {"size": st.st_size, "sha256": sha256_file(p), "mode": stat.S_IMODE(st.st_mode) & 0o777}
    if not files:
        raise StorageError(f"{repo} is empty; expected a model repository written by biva-export")
    return files


def _previous_version(s3, bucket: str, prefix: str) -> str | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key(prefix, MANIFEST))["Body"].read()
        return check_manifest(json.loads(body), "the previous manifest")["version"]
    except Exception:  # none, or one we cannot read: nothing to keep for its readers
        return None


def _prune(s3, bucket: str, prefix: str, keep: set[str], log) -> list[str]:
    """Delete every version folder under `prefix` but `keep`; returns the versions deleted."""
    gone = []
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else "",
                                                         Delimiter="/")
    for page in pages:
        for cp in page.get("CommonPrefixes", []):
            version = cp["Prefix"].rstrip("/").rsplit("/", 1)[-1]
            if not _VERSION.match(version) or version in keep:
                continue
            for objs in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=cp["Prefix"]):
                batch = [{"Key": o["Key"]} for o in objs.get("Contents", [])]
                if batch:
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            gone.append(version)
            log(f"pruned version {version}")
    return gone


def publish(repo: Path, url: str, *, prune: bool = False, log: Callable[[str], object] = print) -> dict:
    """Upload the validated repository `repo` to `url` (s3://bucket/prefix); returns the manifest written.

    Raises StorageError (one line) for a folder biva-export did not write, a bad URL, a missing bucket, missing
    credentials or any other store error."""
    repo = Path(repo)
    bucket, prefix = parse_url(url)
    identity = _report_identity(repo)
    files = repository_files(repo)
    version = content_version(files)
    base = key(prefix, version)
    try:
        s3 = client()
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception as e:
            code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"{url}: the bucket {bucket!r} does not exist at this endpoint; expected an "
                                   "existing bucket (create it first)") from None
            raise
        previous = _previous_version(s3, bucket, prefix)
        for rel, entry in files.items():
            s3.upload_file(str(repo / rel), bucket, key(base, rel))
        # what the store holds now must be what the manifest will name (a concurrent prune, a lost PUT)
        stored = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/"):
            stored.update({o["Key"][len(base) + 1:]: o["Size"] for o in page.get("Contents", [])})
        wrong = [rel for rel, e in files.items() if stored.get(rel) != e["size"]]
        if wrong:
            raise StorageError(f"{url}: after upload {len(wrong)} object(s) are missing or of another size "
                               f"(first: {base}/{wrong[0]}); nothing was published, try again")
        manifest = {"format": FORMAT, "version": version, "files": files, "export": identity,
                    "previous": previous if previous != version else None,
                    "published": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        s3.put_object(Bucket=bucket, Key=key(prefix, MANIFEST), Body=manifest_bytes(manifest),
                      ContentType="application/json")
        log(f"published {repo} to s3://{bucket}/{base}/ ({len(files)} files, "
            f"{sum(e['size'] for e in files.values())} bytes); manifest s3://{bucket}/{key(prefix, MANIFEST)}")
        if prune:
            _prune(s3, bucket, prefix, {version, *([previous] if previous else [])}, log)
    except storage_exceptions() as e:
        raise explain(e, url, bucket) from None
    return manifest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo", type=click.Path(path_type=Path))
@click.argument("url")
@click.option("--prune", is_flag=True, help="Delete the versions under the prefix other than the new one and the one "
                                            "it replaces (kept by default).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(repo: Path, url: str, prune: bool, debug: bool) -> None:
    """Publish the model repository REPO (written by biva-export) to URL, s3://BUCKET/PREFIX.

    The endpoint, credentials and region come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), as for the AWS CLI."""
    try:
        publish(repo, url, prune=prune, log=click.echo)
    except StorageError as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
