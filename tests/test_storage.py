"""The model repository in object storage: biva-publish, biva-fetch and `tritonserver --model-repository s3://...`,
against moto's S3 server on a free loopback port (a real HTTP endpoint: boto3 signs and sends every request)."""
from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest

from biva_core.contract import REPORT, Caps, ModelMeta
from biva_core.storage import MANIFEST, StorageError
from biva_export.publish import main as publish_cli
from biva_export.publish import publish
from biva_serving.fetch import INCOMPLETE, fetch
from biva_serving.fetch import main as fetch_main
from biva_serving.launcher import fetch_s3_repositories

moto_server = pytest.importorskip("moto.server", reason="moto[s3] and flask: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch, tmp_path):
    """Credentials and the endpoint for the code under test (and its subprocesses); a fresh bucket per test."""
    import boto3

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-creds")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3")
    client.bucket = f"biva-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=client.bucket)
    return client


def keys(s3, prefix: str = "") -> dict[str, int]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def small_repo(root: Path, text: str = "v1") -> Path:
    """A repository shaped like biva-export's: an export report, configs, an executable model.py, a zero-byte file,
    binary data and modes other than the umask's."""
    repo = root / "repo"
    (repo / "m" / "1" / "biva_core").mkdir(parents=True)
    meta = ModelMeta(image_shape=(1, 28, 28), likelihood="bernoulli", binarize="threshold", n_layers=3,
                     latent_dim=8, noise_dim=8, groups=("z1", "z2", "z3"), graph_max_batch=64,
                     checkpoint_sha256="ab" * 32, estimator="sample", caps=Caps())
    (repo / REPORT).write_text(json.dumps({"checkpoint": "models/x.pt", "validated": True, "graphs": {},
                                           "serving": {"backend": "python"}, "meta": json.loads(meta.to_json())}))
    (repo / "m" / "config.pbtxt").write_text(f'name: "m"  # {text}\n')
    (repo / "m" / "1" / "model.py").write_text("print('served')\n")
    (repo / "m" / "1" / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (repo / "m" / "1" / "biva_core" / "__init__.py").write_bytes(b"")
    (repo / "m" / "1" / "empty.txt").write_bytes(b"")
    os.chmod(repo / "m" / "1" / "model.py", 0o750)
    os.chmod(repo / "m" / "1" / "empty.txt", 0o600)
    return repo


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root (but the fetch's manifest copy and Python's caches): its bytes and permission bits."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
            and "__pycache__" not in p.parts}


def test_publish_then_fetch_reproduces_the_repository_byte_for_byte_with_modes(s3, tmp_path):
    repo = small_repo(tmp_path)
    url = f"s3://{s3.bucket}/models/ood28"
    manifest = publish(repo, url, log=lambda *_: None)
    assert manifest["export"]["checkpoint_sha256"] == "ab" * 32
    assert set(keys(s3)) == {f"models/ood28/{manifest['version']}/{p}" for p in tree(repo)} | {
        f"models/ood28/{MANIFEST}"}
    want = tree(repo)
    assert want["m/1/model.py"][1] == 0o750 and want["m/1/empty.txt"] == (b"", 0o600)

    fresh = fetch(url, tmp_path / "fresh")  # DEST missing: filled beside it, renamed into place
    assert tree(fresh) == want
    assert json.loads((fresh / MANIFEST).read_text())["version"] == manifest["version"]
    assert not [p for p in tmp_path.iterdir() if ".biva-fetch-" in p.name]

    mount = tmp_path / "emptydir"  # DEST an existing empty folder (an emptyDir mount point cannot be renamed over)
    mount.mkdir()
    assert fetch(url, mount) == mount and tree(mount) == want
    assert sorted(p.name for p in mount.iterdir()) == sorted([MANIFEST, REPORT, "m"])  # no staging, no marker

    # the same version again: DEST is checked and kept, nothing downloaded (the store's copies may go)
    for k in keys(s3, f"models/ood28/{manifest['version']}/"):
        s3.delete_object(Bucket=s3.bucket, Key=k)
    assert fetch(url, mount) == mount and tree(mount) == want


def test_a_half_published_or_altered_repository_is_refused_and_dest_gets_nothing(s3, tmp_path, capsys):
    repo = small_repo(tmp_path)
    url = f"s3://{s3.bucket}/p"
    version = publish(repo, url, log=lambda *_: None)["version"]

    # a file changed after publishing: checked against the manifest's sha256
    s3.put_object(Bucket=s3.bucket, Key=f"p/{version}/m/config.pbtxt", Body=b'name: "x"  # v1\n')  # same size
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(StorageError, match=r"m/config.pbtxt does not match the manifest .*altered after publishing"):
        fetch(url, empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(StorageError, match="does not match the manifest"):
        fetch(url, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if ".biva-fetch-" in p.name]

    # a non-empty file missing from the store
    s3.delete_object(Bucket=s3.bucket, Key=f"p/{version}/m/1/model.onnx")
    with pytest.raises(StorageError, match=r"m/1/model.onnx is listed in the manifest but .* is missing"):
        fetch(url, empty)
    assert list(empty.iterdir()) == []

    # files without a manifest (a publish that died before its last PUT): nothing is published
    s3.delete_object(Bucket=s3.bucket, Key=f"p/{MANIFEST}")
    with pytest.raises(StorageError, match=r"no manifest s3://.*/p/biva-repository.json: nothing is published"):
        fetch(url, empty)
    assert list(empty.iterdir()) == []
    with pytest.raises(SystemExit) as e:  # biva-fetch: one line, exit 1, no traceback
        fetch_main([url, str(empty)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith(f"biva-fetch: {url}: no manifest") and err.count("\n") == 1
    assert list(empty.iterdir()) == []


def test_zero_byte_objects_missing_from_the_store_are_recreated(s3, tmp_path):
    repo = small_repo(tmp_path)
    url = f"s3://{s3.bucket}/z"
    publish(repo, url, log=lambda *_: None)
    zero = [k for k, size in keys(s3).items() if size == 0]
    assert len(zero) == 2  # biva_core/__init__.py and empty.txt were published too
    for k in zero:  # as KServe's storage initializer would leave them: absent
        s3.delete_object(Bucket=s3.bucket, Key=k)
    dest = fetch(url, tmp_path / "dest")
    assert tree(dest) == tree(repo)
    assert (dest / "m/1/biva_core/__init__.py").stat().st_size == 0


def test_republishing_switches_readers_in_one_step_and_prune_keeps_the_previous_version(s3, tmp_path):
    url = f"s3://{s3.bucket}/r"
    v1 = publish(small_repo(tmp_path / "a", "v1"), url, log=lambda *_: None)["version"]
    dest = fetch(url, tmp_path / "dest")
    assert b"v1" in (dest / "m/config.pbtxt").read_bytes()
    v2 = publish(small_repo(tmp_path / "b", "v2"), url, log=lambda *_: None)
    assert v2["version"] != v1 and v2["previous"] == v1
    assert any(k.startswith(f"r/{v1}/") for k in keys(s3))  # a reader of the old manifest can still finish
    assert fetch(url, dest) == dest and tree(dest) == tree(tmp_path / "b" / "repo")  # replaced in place
    assert not (dest / INCOMPLETE).exists()
    v3 = publish(small_repo(tmp_path / "c", "v3"), url, prune=True, log=lambda *_: None)["version"]
    versions = {k.split("/")[1] for k in keys(s3) if k.count("/") > 1}
    assert versions == {v2["version"], v3}


def test_publish_refuses_what_biva_export_did_not_write_and_says_what_was_wrong(s3, tmp_path, monkeypatch):
    from click.testing import CliRunner

    repo = small_repo(tmp_path)
    (repo / REPORT).unlink()
    runner = CliRunner()
    r = runner.invoke(publish_cli, [str(repo), f"s3://{s3.bucket}/x"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [f"Error: {repo} has no {REPORT}; expected a repository written and "
                                             "validated by biva-export (biva-export --ckpt MODEL.pt --out DIR)"]
    assert keys(s3) == {}  # nothing uploaded
    repo = small_repo(tmp_path / "ok")
    cases = {"http://host/x": "is not an S3 URL; expected s3://BUCKET/PREFIX",
             "s3://No_Bucket/x": "is not a valid bucket name",
             "s3://biva-missing-bucket/x": "the bucket 'biva-missing-bucket' does not exist at this endpoint"}
    for url, message in cases.items():
        r = runner.invoke(publish_cli, [str(repo), url])
        assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    report = json.loads((repo / REPORT).read_text())
    (repo / REPORT).write_text(json.dumps({**report, "validated": False}))
    with pytest.raises(StorageError, match="exported with --no-validate; expected a validated repository"):
        publish(repo, f"s3://{s3.bucket}/x")
    assert keys(s3) == {}
    (repo / REPORT).write_text(json.dumps(report))
    # biva-export --publish checks the URL before it spends minutes exporting
    from biva_export.cli import main as export_cli

    r = runner.invoke(export_cli, ["--ckpt", str(tmp_path / "missing.pt"), "--publish", "s3:/typo/x"])
    assert r.exit_code == 1 and r.output.startswith("Error: 's3:/typo/x' is not an S3 URL; expected s3://BUCKET")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    r = runner.invoke(publish_cli, [str(repo), f"s3://{s3.bucket}/x"])
    assert r.exit_code == 1 and "no AWS credentials found; expected AWS_ACCESS_KEY_ID" in r.output
    with pytest.raises(StorageError, match="no AWS credentials"):
        fetch(f"s3://{s3.bucket}/x", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_fetch_refuses_a_dest_it_did_not_write(s3, tmp_path):
    url = f"s3://{s3.bucket}/f"
    publish(small_repo(tmp_path), url, log=lambda *_: None)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="is not empty and holds no repository fetched by biva-fetch"):
        fetch(url, dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    # a fetch that crashed while moving files in left its marker: the next one finishes the job
    crashed = tmp_path / "crashed"
    (crashed / "m").mkdir(parents=True)
    (crashed / INCOMPLETE).write_text("")
    (crashed / "m" / "config.pbtxt").write_text("half")
    assert tree(fetch(url, crashed)) == tree(tmp_path / "repo") and not (crashed / INCOMPLETE).exists()


def test_the_launcher_fetches_s3_repositories_and_leaves_other_paths_alone(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("BIVA_REPOSITORY_CACHE", str(tmp_path / "cache"))
    url = f"s3://{s3.bucket}/l"
    publish(small_repo(tmp_path), url, log=lambda *_: None)
    args = ["--model-repository", url, "--http-port=1", "--model-repository=gs://b/p", "--model-repository", "x",
            "--model-repository=s3://127.0.0.1:9000/b/p"]  # Triton's own form (endpoint in the URL): Triton's
    out, complaint = fetch_s3_repositories(args)
    assert complaint is None and out[1:] == args[2:]
    local = Path(out[0].split("=", 1)[1])
    assert local.parent == tmp_path / "cache" and tree(local) == tree(tmp_path / "repo")
    out, complaint = fetch_s3_repositories([f"--model-repository=s3://{s3.bucket}/none"])
    assert complaint.startswith(f"s3://{s3.bucket}/none: no manifest")


def test_an_exported_repository_has_no_zero_byte_file(tiny_repo):
    """KServe's storage initializer skips zero-byte objects: biva_core/__init__.py beside every model.py would be
    lost, and with it the package the served code imports."""
    files = [p for p in tiny_repo.rglob("*") if p.is_file()]
    inits = [p for p in files if p.name == "__init__.py"]
    assert len(inits) >= 7  # one biva_core package beside every python model
    assert [p for p in files if p.stat().st_size == 0] == []


@pytest.mark.server
@pytest.mark.slow
def test_a_replica_served_from_s3_answers_as_the_local_folder(s3, tmp_path, monkeypatch, tiny_repo, tiny_server):
    """`tritonserver --model-repository s3://...` (the launcher fetches, then serves the cache): the same seeded
    samples as the server of the local folder, exactly (same code, same machine, same seed)."""
    from biva_serving.process import start_server
    from serving_helpers import i64, infer

    monkeypatch.setenv("BIVA_REPOSITORY_CACHE", str(tmp_path / "cache"))
    url = f"s3://{s3.bucket}/models/tiny"
    publish(tiny_repo, url, log=lambda *_: None)
    handle = start_server(url, log_path=tmp_path / "server.log")
    try:
        remote, seed = infer(handle, "grpc", "biva_sample", {"n": i64(4), "seed": i64(2024)}, ["images", "seed"])
    finally:
        handle.stop()
    local, _ = infer(tiny_server, "grpc", "biva_sample", {"n": i64(4), "seed": i64(2024)}, ["images", "seed"])
    assert seed[0] == 2024 and remote.shape == local.shape == (4, *remote.shape[1:])
    assert np.array_equal(remote, local)
    cached = next((tmp_path / "cache").iterdir())
    assert "fetched version" in (tmp_path / "server.log").read_text()
    assert {p: m for p, (_, m) in tree(cached).items()} == {p: m for p, (_, m) in tree(tiny_repo).items()}
