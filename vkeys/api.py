"""The gRPC side of vkeys: the channel, the stubs, and one line for each failed call."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from keys.v1 import keys_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# How long to wait for the channel to report its state after a call failed UNAVAILABLE.
STATE_WAIT_S = 2.0


@dataclass
class Api:
    """The stubs, with the metadata and timeout every call carries."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    timeout: float

    @property
    def keys(self) -> keys_pb2_grpc.KeyServiceStub:
        return keys_pb2_grpc.KeyServiceStub(self.channel)

    @property
    def usage(self) -> keys_pb2_grpc.UsageServiceStub:
        return keys_pb2_grpc.UsageServiceStub(self.channel)

    @property
    def budgets(self) -> keys_pb2_grpc.BudgetServiceStub:
        return keys_pb2_grpc.BudgetServiceStub(self.channel)

    def call(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        return method(request, timeout=self.timeout, metadata=self.metadata, wait_for_ready=False)


def open_channel(
    addr: str, tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None
) -> grpc.Channel:
    """Plaintext, or TLS when a CA or a client certificate is given."""
    if not (tls_ca or tls_cert):
        return grpc.insecure_channel(addr)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    return grpc.secure_channel(addr, credentials)


def connected(channel: grpc.Channel, wait_s: float = STATE_WAIT_S) -> bool:
    """Whether the channel's connection is up now (without trying to open one).

    UNAVAILABLE comes both from the client (no connection) and from the server (it answered,
    but its store is down); the status alone cannot tell them apart, the connection can.
    """
    seen = threading.Event()
    states: list[grpc.ChannelConnectivity] = []

    def record(state: grpc.ChannelConnectivity) -> None:
        states.append(state)
        seen.set()

    channel.subscribe(record, try_to_connect=False)
    try:
        seen.wait(wait_s)
    finally:
        channel.unsubscribe(record)
    return bool(states) and states[0] is grpc.ChannelConnectivity.READY


def rpc_message(err: grpc.RpcError, addr: str, server_answered: bool) -> str:
    """One line: the status name, then what it means here. `server_answered` tells an
    UNAVAILABLE the server sent (its store is down) from one where no connection was made."""
    code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = " ".join(((err.details() if isinstance(err, grpc.Call) else str(err)) or "").split())
    if code is grpc.StatusCode.UNAVAILABLE and server_answered:
        if "redis" in details.lower():
            details = f"the server at {addr} cannot reach Redis; try again shortly ({details})"
        else:
            details = f"the server at {addr} is unavailable; try again shortly ({details})"
    elif code is grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach {addr}: {details}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"no answer from {addr} in time: {details}"
    elif code is grpc.StatusCode.UNAUTHENTICATED and "admin token" in details:
        # the server's hint is for raw gRPC callers; say how vkeys takes the token
        wrong = "wrong" in details
        details = (
            "the admin token is wrong" if wrong else "no admin token"
        ) + "; set EXTAUTHZ_ADMIN_TOKEN or pass --token"
    return f"{code.name}: {details}"


def explain(err: grpc.RpcError, channel: grpc.Channel, addr: str) -> str:
    """The one line for a failed call, asking the channel whether the server answered."""
    unavailable = isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.UNAVAILABLE
    return rpc_message(err, addr, server_answered=unavailable and connected(channel))
