"""Load test of `soma-lightning serve`: requests/s and latency percentiles at several client concurrencies.

    python bench/serve.py --ckpt runs/quickstart/version_0                          # CPU
    python bench/serve.py --ckpt V1_RUN_OR_EXPORT --device cuda --max-tokens 128     # one GPU

Starts `python -m soma_lightning serve --ckpt CKPT --device DEVICE` on 127.0.0.1 (a free port; or uses a
server already running at --port with --no-start), then for each concurrency C (default 1, 8, 32) runs C
client threads, each sending greedy completions one after another: prompts are consecutive slices of the
packaged tiny-Shakespeare text, of lengths spread evenly over --prompt-lengths, each asking for
--max-tokens tokens. A level ends after --requests requests or --max-seconds, whichever comes first
(requests in flight then finish and count). One untimed request warms the server up first. Per level:
requests/s (completed requests over the level's wall time), generated tokens/s, and p50/p99 latency of a
request (send to last byte). Only 127.0.0.1 is ever contacted.
"""

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import soma_lightning

TEXT = (Path(soma_lightning.__file__).parent / "corpora" / "tinyshakespeare.txt").read_text()[:200_000]


def start_server(ckpt: str, device: str, max_batch: int, max_cohorts: int) -> tuple[subprocess.Popen, int]:
    """The server process and its port, read from uvicorn's start-up line; its log is drained in a thread."""
    process = subprocess.Popen(
        [sys.executable, "-m", "soma_lightning", "serve", "--ckpt", ckpt, "--device", device, "--port", "0", "--max_batch", str(max_batch),
         "--max_cohorts", str(max_cohorts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for line in process.stderr:
        if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(match[1])
        print(line, end="", file=sys.stderr)
    raise SystemExit(f"the server exited with code {process.wait()} before listening")


def complete(port: int, prompt: str, max_tokens: int) -> int:
    """One greedy completion; -> its completion tokens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}))
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body.decode()[:300]}")
        return json.loads(body)["usage"]["completion_tokens"]
    finally:
        connection.close()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def level(port: int, clients: int, requests: int, max_seconds: float, max_tokens: int, lengths: tuple[int, int]) -> dict:
    latencies: list[float] = []
    tokens = [0]
    issued = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + max_seconds

    def client() -> None:
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() > deadline:
                    return
                i = issued[0]
                issued[0] += 1
            length = lengths[0] + (i * 7) % (lengths[1] - lengths[0] + 1)
            prompt = TEXT[i * 997 % (len(TEXT) - length) :][:length]
            t0 = time.perf_counter()
            n = complete(port, prompt, max_tokens)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += n

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients, "requests": len(latencies), "seconds": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens[0] / wall,
        "p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="run directory, checkpoint or export to serve (not with --no-start)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per level at most")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="a level sends no new request after this")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=[16, 64], metavar=("MIN", "MAX"))
    parser.add_argument("--max-cohorts", type=int, default=2, help="the server's --max_cohorts")
    parser.add_argument("--no-start", action="store_true", help="use a server already listening on 127.0.0.1:--port")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if not args.no_start and args.ckpt is None:
        parser.error("--ckpt is required unless --no-start")
    process, port = (None, args.port) if args.no_start else start_server(args.ckpt, args.device, max(args.concurrency), args.max_cohorts)
    try:
        complete(port, TEXT[: args.prompt_lengths[0]], args.max_tokens)
        rows = [level(port, c, args.requests, args.max_seconds, args.max_tokens, tuple(args.prompt_lengths)) for c in args.concurrency]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print(f"{'clients':>7} {'requests':>8} {'seconds':>8} {'req/s':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['seconds']:>8.1f} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>9.1f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
