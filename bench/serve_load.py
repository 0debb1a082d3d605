"""Load on `sample.py serve`: throughput at 1 and 8 clients, then many clients at once.

    python bench/serve_load.py                         # out/default/best.pt (make demo first)
    python bench/serve_load.py CKPT --clients 50 --seconds 30

Starts the server as its own process on 127.0.0.1 (a free port), then, with the real
`openai` client (streaming, no retries):

1. tokens/s: N clients each streaming completions back to back for --rate-seconds, for
   each N in --rate-clients (default 1 and 8);
2. load: --clients clients for --seconds, every tenth request abandoned after a few tokens
   (a client that goes away), a refused one waiting its Retry-After before the next.

Every request must end served (200, [DONE]) or refused (503); anything else is counted as
an error. The server's resident memory (RSS, from /proc) is read before, during (the
peak) and after the load, once it has gone idle. Prints a table and writes
bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Served:
    """`sample.py serve` in its own process, on a free port of 127.0.0.1."""

    def __init__(self, checkpoint: str, max_concurrent: int, max_waiting: int, max_tokens: int, threads: int):
        command = [sys.executable, str(ROOT / "sample.py"), "serve", checkpoint, "--host", "127.0.0.1", "--port", "0",
                   "--max-concurrent", str(max_concurrent), "--max-waiting", str(max_waiting),
                   "--max-tokens", str(max_tokens), "--device", "cpu", "--threads", str(threads)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if "http://127.0.0.1:" not in line:
            self.process.kill()
            raise SystemExit(f"error: the server did not start ({line.strip() or 'no output'})")
        self.url = "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split("/")[0]

    def stop(self) -> int:
        self.process.send_signal(2)  # Ctrl-C
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return -9


class Tally:
    def __init__(self):
        self.served = self.refused = self.abandoned = self.tokens = 0
        self.errors: list[str] = []


async def one_request(client: openai.AsyncOpenAI, model: str, max_tokens: int, seed: int, abandon_after: int | None,
                      tally: Tally) -> float:
    """One streamed completion; returns how long to wait before the next (Retry-After on a 503)."""
    try:
        stream = await client.completions.create(model=model, prompt="", max_tokens=max_tokens, seed=seed,
                                                 stream=True, stream_options={"include_usage": True})
        received = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                received += 1
            if chunk.usage is not None:
                received = chunk.usage.completion_tokens
            if abandon_after is not None and received >= abandon_after:
                await stream.close()
                tally.abandoned += 1
                tally.tokens += received
                return 0.0
        tally.served += 1
        tally.tokens += received
        return 0.0
    except openai.APIStatusError as error:
        if error.status_code == 503:
            tally.refused += 1
            return float(error.response.headers.get("retry-after", "1"))
        tally.errors.append(f"{error.status_code}: {error.message}")
    except openai.APIError as error:  # connection problems, a stream cut short
        tally.errors.append(f"{type(error).__name__}: {error}")
    return 0.0


async def clients(url: str, model: str, count: int, seconds: float, max_tokens: int, abandon_every: int,
                  tally: Tally, on_tick=None) -> float:
    """``count`` clients sending requests back to back until ``seconds`` have passed; returns
    the wall time until the last one finished."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    start = time.perf_counter()
    deadline = start + seconds

    async def loop(index: int) -> None:
        sent = 0
        while time.perf_counter() < deadline:
            sent += 1
            abandon = 3 if abandon_every and (index + sent) % abandon_every == 0 else None
            pause = await one_request(client, model, max_tokens, seed=index * 10_000 + sent, abandon_after=abandon,
                                      tally=tally)
            if pause:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.perf_counter())))

    async def ticker() -> None:
        while on_tick is not None:
            on_tick()
            await asyncio.sleep(0.25)

    tick = asyncio.create_task(ticker())
    await asyncio.gather(*(loop(i) for i in range(count)))
    tick.cancel()
    await client.close()
    return time.perf_counter() - start


def health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.load(response)


def wait_idle(url: str, timeout: float = 30) -> float:
    start = time.perf_counter()
    while True:
        state = health(url)
        if state["running"] == 0 and state["waiting"] == 0:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            raise SystemExit(f"error: the server did not go idle within {timeout:g} s: {state}")
        time.sleep(0.05)


def run(args: argparse.Namespace) -> dict:
    alone = library_tokens_per_s(args.checkpoint, args.max_tokens, args.threads)
    server = Served(args.checkpoint, args.max_concurrent, args.max_waiting, args.max_tokens, args.threads)
    try:
        model = asyncio.run(_model_id(server.url))
        warm = Tally()
        asyncio.run(clients(server.url, model, 1, 0.5, args.max_tokens, 0, warm))
        rates = []
        for count in args.rate_clients:
            tally = Tally()
            elapsed = asyncio.run(clients(server.url, model, count, args.rate_seconds, args.max_tokens, 0, tally))
            rates.append({"clients": count, "seconds": round(elapsed, 2), "requests": tally.served,
                          "tokens": tally.tokens, "tokens_per_s": round(tally.tokens / elapsed, 1),
                          "tokens_per_s_per_client": round(tally.tokens / elapsed / count, 1),
                          "refused": tally.refused, "errors": tally.errors[:5]})
        wait_idle(server.url)
        rss_start = rss_mib(server.process.pid)
        peak = [rss_start]
        tally = Tally()
        elapsed = asyncio.run(clients(server.url, model, args.clients, args.seconds, args.max_tokens,
                                      args.abandon_every, tally,
                                      on_tick=lambda: peak.append(rss_mib(server.process.pid))))
        idle_after = wait_idle(server.url)
        time.sleep(args.settle_seconds)
        rss_end = rss_mib(server.process.pid)
        state = health(server.url)
    finally:
        exit_code = server.stop()
    return {
        "checkpoint": args.checkpoint, "model": model, "max_tokens": args.max_tokens,
        "max_concurrent": args.max_concurrent, "max_waiting": args.max_waiting, "threads": args.threads,
        "library_tokens_per_s": round(alone, 1), "rates": rates,
        "load": {"clients": args.clients, "seconds": round(elapsed, 2), "served": tally.served,
                 "refused_503": tally.refused, "abandoned": tally.abandoned, "errors": len(tally.errors),
                 "error_samples": tally.errors[:5], "tokens": tally.tokens,
                 "tokens_per_s": round(tally.tokens / elapsed, 1), "idle_after_s": round(idle_after, 2),
                 "rss_start_mib": round(rss_start, 1), "rss_peak_mib": round(max(peak), 1),
                 "rss_end_mib": round(rss_end, 1), "running_after": state["running"],
                 "waiting_after": state["waiting"]},
        "server_exit_code": exit_code,
    }


def library_tokens_per_s(checkpoint: str, max_tokens: int, threads: int, repeats: int = 5) -> float:
    """The token loop alone, in this process, for the same request (no HTTP): the best of
    ``repeats`` runs."""
    import torch

    from model.checkpoint import load_for_generation
    from model.serve import ServeSettings, completion_events, completion_job

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tokenizer, _ = load_for_generation(checkpoint, torch.device("cpu"))
        job = completion_job({"prompt": "", "max_tokens": max_tokens, "seed": 1}, ServeSettings("bench"), tokenizer)
        best = 0.0
        with torch.inference_mode():
            for _ in range(repeats):
                start = time.perf_counter()
                tokens = sum(e.token is not None for step in completion_events(model, tokenizer, job, "exact")
                             for e in step)
                best = max(best, tokens / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


async def _model_id(url: str) -> str:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    try:
        return (await client.models.list()).data[0].id
    finally:
        await client.close()


def print_table(result: dict) -> None:
    print(f"server: {result['model']}, --max-concurrent {result['max_concurrent']}, "
          f"--max-waiting {result['max_waiting']}, --threads {result['threads']}, {result['max_tokens']} tokens per "
          f"request; the token loop alone, without HTTP: {result['library_tokens_per_s']} tokens/s")
    print("| clients | seconds | requests | tokens | tokens/s | tokens/s per client |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in result["rates"]:
        print(f"| {r['clients']} | {r['seconds']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']} | "
              f"{r['tokens_per_s_per_client']} |")
    load = result["load"]
    print(f"load: {load['clients']} clients for {load['seconds']} s: {load['served']} served, "
          f"{load['refused_503']} refused (503), {load['abandoned']} abandoned by their client, "
          f"{load['errors']} other errors; {load['tokens']} tokens ({load['tokens_per_s']}/s); idle "
          f"{load['idle_after_s']} s after the last client; RSS {load['rss_start_mib']} MiB before, "
          f"{load['rss_peak_mib']} peak, {load['rss_end_mib']} after; server exit code {result['server_exit_code']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="out/default/best.pt", help="checkpoint to serve")
    parser.add_argument("--clients", type=int, default=50, help="concurrent streaming clients of the load phase")
    parser.add_argument("--seconds", type=float, default=30, help="length of the load phase")
    parser.add_argument("--rate-clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                        help="client counts of the throughput phases, comma-separated")
    parser.add_argument("--rate-seconds", type=float, default=10, help="length of each throughput phase")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--max-concurrent", type=int, default=8, help="the server's --max-concurrent")
    parser.add_argument("--max-waiting", type=int, default=16, help="the server's --max-waiting")
    parser.add_argument("--threads", type=int, default=1, help="the server's --threads")
    parser.add_argument("--abandon-every", type=int, default=10, help="every n-th request of the load phase is "
                        "abandoned after 3 tokens (0: none)")
    parser.add_argument("--settle-seconds", type=float, default=1.0, help="wait this long after the load before "
                        "reading the memory again")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json",
                        help="where to write the JSON")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"error: checkpoint not found: {args.checkpoint} (run `make demo` first, or name one)", file=sys.stderr)
        return 2
    result = run(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
