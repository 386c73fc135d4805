"""Bounded closed-loop HTTP clients: each of C clients keeps exactly one request in flight on
its own keep-alive connection, sends the next when the answer arrives, and stops at the end
of the window (the offered load is C, never more; a slow server slows its clients).

One asyncio loop drives every client over raw HTTP/1.1, so 32 clients cost the 2-core
machine far less than 32 threads of a client library would; the load generator still shares
the cores with the server, which is what a loadtest on one machine measures.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Request = tuple[str, bytes, dict[str, str]]
"""(path, body, extra headers) of one POST."""


@dataclass(frozen=True)
class Point:
    """One measured (configuration, concurrency): what the table shows."""

    model: str
    runtime: str
    threads: int
    """The replica's runtime threads (the in-process rows it is judged against ran as many)."""
    ingress: str
    """Ray Serve's front door: proxy (its HTTP proxy) or haproxy (its high-throughput mode)."""
    route: str
    batching: str
    """images (the server's cap) or off (one image a call)."""
    cap: str
    concurrency: int
    images: int
    """Images per request."""
    requests: int
    errors: int
    seconds: float
    req_per_s: float
    img_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch: float | None
    """Mean images per runtime call the answered requests ran in (the server says, per request)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, request: Request
                ) -> tuple[int, bytes, int | None, bool]:
    """(status, body, Inference-Header-Content-Length, connection closed) of one POST."""
    path, body, headers = request
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, header_length, close = 0, None, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "content-length":
            length = int(value)
        elif key == "inference-header-content-length":
            header_length = int(value)
        elif key == "connection" and value.lower() == "close":
            close = True
    return status, await reader.readexactly(length), header_length, close


def _batch_images(payload: bytes, header_length: int | None) -> int | None:
    """The batch size the server reports: OIP responses in `parameters`, the image route at the top."""
    try:
        answer = json.loads(payload[:header_length] if header_length else payload)
    except ValueError:
        return None
    return (answer.get("parameters") or {}).get("batch_images", answer.get("batch_images"))


Sample = tuple[float, float, bool, "int | None"]
"""(sent, answered, ok, batch images) of one request."""


async def _client(host: str, port: int, requests: list[Request], first: int, step: int, stop_at: float,
                  samples: list[Sample]) -> None:
    connection = None
    index = first
    while time.perf_counter() < stop_at:
        if connection is None:
            connection = await asyncio.open_connection(host, port)
        request = requests[index % len(requests)]
        index += step
        started = time.perf_counter()
        try:
            status, payload, header_length, close = await _post(*connection, f"{host}:{port}", request)
            ok, batch = status == 200, _batch_images(payload, header_length) if status == 200 else None
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            ok, batch, close = False, None, True
        samples.append((started, time.perf_counter(), ok, batch))
        if close:
            connection[1].close()
            connection = None
    if connection is not None:
        connection[1].close()


def closed_loop(host: str, port: int, requests: list[Request], concurrency: int, *, warmup_s: float,
                seconds: float, images_per_request: int = 1) -> dict[str, Any]:
    """Run `concurrency` clients for warmup + seconds over `requests` (client i sends requests
    i, i + C, ...), each finishing its last request after the window. Throughput counts the
    answers that arrived inside the timed window; latency percentiles, the requests sent and
    answered inside it; errors, every failed request of the run, warm-up included."""
    async def main() -> tuple[list[Sample], float, float]:
        samples: list[Sample] = []
        start = time.perf_counter()
        stop_at = start + warmup_s + seconds
        await asyncio.gather(*(_client(host, port, requests, i, concurrency, stop_at, samples)
                               for i in range(concurrency)))
        return samples, start + warmup_s, stop_at

    samples, warm_until, stop_at = asyncio.run(main())
    inside = [s for s in samples if warm_until <= s[1] <= stop_at]
    answered = [s for s in inside if s[2]]
    timed = [s for s in answered if s[0] >= warm_until]
    latency_ms = np.array([(done - sent) * 1e3 for sent, done, _, _ in timed] or [np.nan])
    batches = [b for *_, b in answered if isinstance(b, int)]
    return dict(requests=len(answered), errors=sum(not ok for _, _, ok, _ in samples), seconds=seconds,
                req_per_s=len(answered) / seconds, img_per_s=len(answered) * images_per_request / seconds,
                p50_ms=float(np.percentile(latency_ms, 50)), p90_ms=float(np.percentile(latency_ms, 90)),
                p99_ms=float(np.percentile(latency_ms, 99)), mean_batch=float(np.mean(batches)) if batches else None)
