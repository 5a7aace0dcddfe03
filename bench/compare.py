"""Load runs that alternate between targets, so noise from elsewhere hits each alike.

Each target gets a short probe (warm-up, and its rate, to size the real runs to about
`seconds`), then `rounds` runs in turn, the order reversed every other round. A target
may name a counter that must grow by exactly the requests h2load completed (our allow
count: proof that every call was a real gRPC success, which h2load cannot see), and the
processes whose CPU time is its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench import load
from bench.stack import cpu_seconds


@dataclass
class Target:
    name: str
    url: str
    body: bytes
    headers: Sequence[str] = load.GRPC_HEADERS
    h1: bool = False
    counter: Callable[[], float] | None = None  # must grow by the requests of each run
    pids: Sequence[int] = ()  # the server's processes
    other_pids: Sequence[int] = ()  # e.g. Redis, reported apart
    other_cpu: Callable[[], float] | None = None  # CPU seconds so far, instead of other_pids
    before: Callable[[], None] | None = None  # sets the machine up for each of its runs


@dataclass
class Series:
    name: str
    runs: list[load.LoadResult] = field(default_factory=list)
    cpu_s: float = 0.0
    other_cpu_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.runs)

    @property
    def latencies(self) -> tuple[int, ...]:
        return tuple(sorted(v for r in self.runs for v in r.latencies_us))

    @property
    def rps(self) -> float:
        return self.requests / sum(r.seconds for r in self.runs)

    @property
    def p50_ms(self) -> float:
        return load.percentile(self.latencies, 50) / 1000

    @property
    def p99_ms(self) -> float:
        return load.percentile(self.latencies, 99) / 1000

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_s / self.requests * 1e6

    @property
    def other_cpu_us_per_call(self) -> float:
        return self.other_cpu_s / self.requests * 1e6

    def summary(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "requests": self.requests,
            "rounds": len(self.runs),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }
        if self.cpu_s:
            out["server_cpu_us_per_call"] = round(self.cpu_us_per_call, 1)
        if self.other_cpu_s:
            out["other_cpu_us_per_call"] = round(self.other_cpu_us_per_call, 1)
        return out


def _cpu(pids: Sequence[int]) -> float:
    return cpu_seconds(list(pids)) if pids else 0.0


def _run(
    target: Target, requests: int, clients: int, streams: int
) -> tuple[load.LoadResult, float, float]:
    """One load run: its result and the CPU seconds of the target's processes during it."""
    if target.before is not None:
        target.before()
    before = target.counter() if target.counter else 0.0
    other_cpu = target.other_cpu or (lambda: _cpu(target.other_pids))
    cpu, other = _cpu(target.pids), other_cpu()
    result = load.run(
        target.url,
        requests=requests,
        clients=clients,
        streams=streams,
        body=target.body,
        headers=target.headers,
        h1=target.h1,
    )
    cpu, other = _cpu(target.pids) - cpu, other_cpu() - other
    if result.succeeded != result.requests or result.requests != requests:
        raise RuntimeError(f"{target.name}: {result.summary()} of {requests} requests")
    if target.counter is not None:
        grew = target.counter() - before
        if grew != result.requests:
            raise RuntimeError(f"{target.name}: sent {result.requests}, server counted {grew}")
    return result, cpu, other


def alternate(
    targets: Sequence[Target],
    *,
    clients: int,
    streams: int = 1,
    seconds: float,
    rounds: int,
    probe: int = 300,
) -> dict[str, Series]:
    sizes = {}
    for target in targets:
        rate = _run(target, max(probe, clients * streams * 4), clients, streams)[0].rps
        sizes[target.name] = max(probe, int(rate * seconds))
    series = {target.name: Series(target.name) for target in targets}
    for round_ in range(rounds):
        # ABBA order: a drift in the machine's load favours no target
        for target in targets if round_ % 2 == 0 else reversed(targets):
            result, cpu, other = _run(target, sizes[target.name], clients, streams)
            one = series[target.name]
            one.runs.append(result)
            one.cpu_s += cpu
            one.other_cpu_s += other
    return series
