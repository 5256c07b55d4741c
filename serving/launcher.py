"""`tritonserver`: the command users run, `tritonserver --model-repository triton_models`.

It checks the repository path, finds the binary (binary.py: a real Triton on PATH, else the one bundled in
nvidia-pytriton) and runs it behind the HTTP and gRPC fronts, watched by the supervisor (guard.py). With
`--biva-direct` it runs Triton alone with the arguments as given, as a plain tritonserver would. The Python API
that starts a server on free ports for tests, the demo and the bench is process.py.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from biva_core.contract import REPORT
from biva_core.runtimes import check_package_isa

from .binary import resolve
from .net import DIRECT_FLAG, take_flag


def fetch_s3_repositories(args: Sequence[str]) -> tuple[list[str], str | None]:
    """The arguments with every `--model-repository s3://...` fetched (fetch.py: checked against its manifest)
    into a local cache folder and replaced by that folder; or a one-line complaint. gs://, as:// and Triton's own
    s3://HOST:PORT/BUCKET/PATH form are left to Triton."""
    out, i, args = [], 0, list(args)
    while i < len(args):
        a, value, n = args[i], "", 1
        if a == "--model-repository" and i + 1 < len(args):
            value, n = args[i + 1], 2
        elif a.startswith("--model-repository="):
            value = a.split("=", 1)[1]
        if value.startswith("s3://") and ":" not in value[5:].split("/", 1)[0]:  # not Triton's s3://HOST:PORT/...
            from biva_core.storage import StorageError

            from .fetch import cache_dir, fetch
            try:
                local = fetch(value, cache_dir(value), log=lambda m: print(f"tritonserver: {m}", flush=True))
            except StorageError as e:
                return args, str(e)
            out.append(f"--model-repository={local}")
        else:
            out.extend(args[i:i + n])
        i += n
    return out, None


def check_repository(args: Sequence[str]) -> str | None:
    """A one-line complaint when --model-repository names a local folder that is not there (or no folder)."""
    repo, _ = take_flag(list(args), "--model-repository", "")
    if not repo or "://" in repo:  # none given (Triton says so), or a cloud path Triton reads itself
        return None
    path = Path(repo)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        return (f"--model-repository {repo} {what} (looked in {Path.cwd()}); export one with: "
                "biva-export --ckpt models/ood28.pt --out triton_models")
    return _package_complaint(path)


def _package_complaint(repo: Path) -> str | None:
    """A repository whose AOTInductor packages need instruction sets this processor lacks, in one line."""
    try:
        graphs = json.loads((repo / REPORT).read_text()).get("graphs", {})
    except (OSError, ValueError, AttributeError):
        return None  # not written by biva-export: Triton loads it as it is
    for name, entry in graphs.items():
        isa = (entry.get("package") or {}).get("isa") if isinstance(entry, dict) else None
        if isa:
            try:
                check_package_isa(name, isa)
            except RuntimeError as e:
                return str(e)
    return None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """`tritonserver ARGS`: Triton behind the fronts and the supervisor, or alone with --biva-direct."""
    args = list(sys.argv[1:] if argv is None else argv)
    direct = DIRECT_FLAG in args
    args = [a for a in args if a != DIRECT_FLAG]
    args, complaint = fetch_s3_repositories(args)
    complaint = complaint or check_repository(args)
    if complaint:
        print(f"tritonserver: {complaint}", file=sys.stderr)
        raise SystemExit(2)
    try:
        binary, full, env = resolve(args)
    except RuntimeError as exc:
        print(f"tritonserver: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if direct:
        os.execve(binary, [str(binary), *full], env)
    from .guard import serve

    raise SystemExit(serve(binary, full, env))


if __name__ == "__main__":
    main()
