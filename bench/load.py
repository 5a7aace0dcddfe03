"""h2load: gRPC frames in a file, one load run, its per-request latencies.

h2load (nghttp2-client) is a C load generator, so the client is not what limits a run.
It posts the same body on every request; a gRPC unary call is an HTTP/2 POST whose body
is one length-prefixed message, so a serialized request behind its 5-byte header is a
valid call. h2load counts HTTP statuses only (a gRPC error is still HTTP 200 with
`grpc-status` in the trailers), so callers check the server's own counters after a run.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = (
    "h2load not found: it comes with Debian's nghttp2-client "
    "(`sudo apt-get install nghttp2-client`, or `make bench-deps`)"
)
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def h2load_binary() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise FileNotFoundError(INSTALL_HINT)
    return found


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message: flag 0, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LoadResult:
    requests: int  # done
    succeeded: int  # HTTP 2xx
    seconds: float
    latencies_us: tuple[int, ...]  # sorted, one per logged request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_us, 50) / 1000

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_us, 99) / 1000

    def summary(self) -> dict[str, float | int]:
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "seconds": round(self.seconds, 3),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s)")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded")


def parse_output(text: str, log_lines: Sequence[str]) -> LoadResult:
    finished = _FINISHED.search(text)
    counts = _REQUESTS.search(text)
    if finished is None or counts is None:
        raise RuntimeError(f"unexpected h2load output:\n{text[-2000:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    latencies = sorted(int(line.split("\t")[2]) for line in log_lines if line.count("\t") == 2)
    return LoadResult(int(counts.group(3)), int(counts.group(4)), seconds, tuple(latencies))


def run(
    url: str,
    *,
    requests: int,
    clients: int = 1,
    streams: int = 1,
    body: bytes | None = None,
    headers: Sequence[str] = (),
    h1: bool = False,
    rate_per_client: int = 0,
    timeout_s: float = 120,
) -> LoadResult:
    """`requests` calls over `clients` connections with `streams` in flight on each (h2);
    `rate_per_client` > 0 paces each connection (h2load --rps) instead of a closed loop."""
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as tmp:
        log_file = Path(tmp) / "requests.log"
        args = [
            h2load_binary(),
            "-n",
            str(requests),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            f"--log-file={log_file}",
        ]
        if body is not None:
            data = Path(tmp) / "body.bin"
            data.write_bytes(body)
            args.append(f"--data={data}")
        for header in headers:
            args += ["-H", header]
        if h1:
            args.append("--h1")
        if rate_per_client:
            args.append(f"--rps={rate_per_client}")
        args.append(url)
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        return parse_output(done.stdout, lines)
