"""biva-client's edges: one line and the right exit code for a bad URL, an unwritable output, the
wrong protocol for the port; only transient failures are retried (never a 4xx or a parse error)."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from biva_client import BivaClient, InputError, ServerError
from biva_client.api import EXIT_INPUT, EXIT_UNAVAILABLE, check_url
from serving_helpers import free_port

pytestmark = pytest.mark.timeout(300)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biva_client.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    return "\n".join(lines)


@pytest.mark.parametrize("url", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "http://127.0.0.1:x"])
def test_a_bad_url_is_one_line_and_exit_2(url) -> None:
    with pytest.raises(InputError, match="port in 1..65535"):
        check_url(url)
    r = _cli("--url", url, "sample", "--n", "1", "--out", "/tmp/never_written.png")
    assert r.returncode == EXIT_INPUT and "port in 1..65535" in _one_line(r)


def test_an_unwritable_output_is_refused_before_anything_is_sent(tmp_path) -> None:
    # nothing listens at this URL: a request sent first would exit 4 (unavailable), not 2
    url = f"127.0.0.1:{free_port()}"
    blocker = tmp_path / "a_file"  # a file where a folder should be: not writable even as root
    blocker.write_text("")
    for args in (["sample", "--n", "1", "--out", f"{blocker}/samples.png"],
                 ["likelihood", "--data", "digits", "--limit", "2", "--out", f"{blocker}/ll.csv"],
                 ["encode", "--data", "digits", "--limit", "2", "--out", f"{blocker}/z.npz"],
                 ["sample", "--n", "1", "--out", str(tmp_path)]):
        r = _cli("--url", url, "--retries", "0", *args)
        line = _one_line(r)
        assert r.returncode == EXIT_INPUT and ("cannot write" in line or "is a directory" in line), (args, line)


@pytest.mark.server
def test_http_at_the_grpc_port_says_so_and_exits_4(tiny_server) -> None:
    r = _cli("--url", tiny_server.grpc_url, "--protocol", "http", "--retries", "1", "sample", "--n", "1",
             "--out", "/tmp/never_written.png")
    assert r.returncode == EXIT_UNAVAILABLE, r.stderr
    _one_line(r)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_refused_request_is_not_retried(tiny_server, protocol) -> None:
    url = tiny_server.http_url if protocol == "http" else tiny_server.grpc_url
    with BivaClient(url, protocol, retries=6, backoff=2.0) as client:
        client.meta  # noqa: B018 - fetched before timing
        t0 = time.monotonic()
        with pytest.raises(ServerError, match="binary") as e:
            client.encode(np.full((1, 1, 28, 28), 0.5, np.float32), seed=1)  # a 400 from the front model
        assert time.monotonic() - t0 < 1.5 and not e.value.transient  # the first backoff alone is 2 s
        assert client.sample(2, seed=0).shape == (2, 1, 28, 28)


@pytest.mark.server
def test_a_json_parse_error_is_not_retried(tiny_server) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", tiny_server.http_port, timeout=30)
    conn.request("POST", "/v2/models/biva_sample/infer",
                 body=b'{"inputs": [{"name": "n", "shape": [1], "datatype": "INT64", "data": [5.5]}]}')
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert 400 <= r.status < 600 and r.status not in (502, 503, 504), (r.status, body)
    from biva_client.api import _busy

    assert not _busy(str(r.status), body.decode())
