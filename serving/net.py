"""Ports and command-line flags: the small helpers the serving modules share (they import nothing of the others)."""
from __future__ import annotations

import socket
from typing import Sequence

LOOPBACK = "127.0.0.1"
DIRECT_FLAG = "--biva-direct"  # the launcher's flag: Triton alone, no fronts and no supervisor


def has_flag(args: Sequence[str], name: str) -> bool:
    return any(arg == name or arg.startswith(name + "=") for arg in args)


def take_flag(args: list[str], name: str, default: str) -> tuple[str, list[str]]:
    """The value of `name` (`--name=v` or `--name v`, the last one wins) and the arguments without it."""
    value, rest, i = default, [], 0
    while i < len(args):
        a = args[i]
        if a == name and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            continue
        if a.startswith(name + "="):
            value = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return value, rest


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback (all held open until chosen, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LoopbackUrls:
    """`http_url` and `grpc_url` ("127.0.0.1:PORT") of something that has `http_port` and `grpc_port`."""

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"
