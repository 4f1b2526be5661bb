"""Serving benchmark: one client against 8 concurrent clients, through the `openai` package, against `sftflow serve`.

Usage: .venv/bin/python bench/serve.py [--requests 16] [--max-tokens 48] [--repeats 3] [--clients 8]
                                       [--model NAME@champion --tracking-uri URI]

What is served: without --model, the default base model (SmolLM2-135M-Instruct from the packaged GGUF, converted and
cached by tasks/model/base_model.py) under a LoRA adapter whose B matrices are zero (PEFT's default init), registered
as a `lora` version in a throwaway sqlite MLflow store. The server merges the adapter into the fp32 base on a CPU
(tasks/serving/serve.py `serving_method`), so this is the plain base's compute and answers, loaded the way a real
champion is. With --model, that registered version is served from --tracking-uri instead.

The server is the real CLI (`sftflow serve ... --port 0`) in its own process; the clients are threads of this one,
each with its own `openai.OpenAI`. The prompts are order-extraction requests from the default data's generator
(tasks/data/synth.py: its instruction, a blank line, an order message), greedy, at most --max-tokens new tokens. Each
repeat sends the same --requests prompts twice: one by one from one client, then spread over --clients clients
(each sends its share one after another). One untimed warm-up of each kind runs first. Throughput is answers per
second of wall time; latency is each request's own wall time (p50, p95).

The last line printed is one JSON object: {"ratio", "ratio_min", "ratio_max", "single_answers_per_s",
"concurrent_answers_per_s", "single_p50_s", "single_p95_s", "concurrent_p50_s", "concurrent_p95_s", "repeats",
"requests", "clients", "max_tokens", "completion_tokens_mean", "finish_reasons", "largest_batch", "served", "dtype",
"cpu", "load_avg", "server"}: medians over the repeats, `ratio` = concurrent answers/s over single answers/s.

Figures, with their CPU and commit: bench/README.md (Serving).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = "bench-serve"


def order_prompts(n: int, seed: int = 123) -> list[str]:
    """Return `n` order-extraction prompts as the format step builds them from the default data's Alpaca rows."""
    from tasks.data.synth import make_order

    rng = random.Random(seed)
    return [f"{row['instruction']}\n\n{row['input']}" for row in (make_order(rng) for _ in range(n))]


def register_base(root: Path) -> str:
    """Register the default base under a zero LoRA adapter in a sqlite store under `root`; return the store's URI."""
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_base_model

    base = resolve_base_model(DEFAULT_BASE_MODEL)
    adapter = root / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules="all-linear")
                   ).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("bench", artifact_location=(root / "art").as_uri())).info.run_id
    client.log_artifacts(run_id, str(adapter), "trained")
    client.set_terminated(run_id)
    client.create_registered_model(NAME)
    client.create_model_version(NAME, f"runs:/{run_id}/trained", run_id=run_id,
                                tags={"base_model": base, "train_method": "lora"})
    client.set_registered_model_alias(NAME, "champion", "1")
    return uri


def start_server(ref: str, uri: str, runs: Path, max_tokens: int, clients: int, dtype: str
                 ) -> tuple[subprocess.Popen, str]:
    """Start `sftflow serve` on a free port; return the process and its URL once it says it serves."""
    cli = Path(sys.executable).parent / "sftflow"
    log = (runs / "server.log").open("w")
    proc = subprocess.Popen([str(cli), "serve", ref, "--tracking-uri", uri, "--runs-dir", str(runs), "--port", "0",
                             "--max-new-tokens", str(max_tokens), "--max-batch", str(clients), "--dtype", dtype],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    first = proc.stdout.readline()
    if not (match := re.search(r" on (http://127\.0\.0\.1:\d+)/v1: ", first)):
        proc.kill()
        raise SystemExit(f"the server did not start: {first!r}\n{(runs / 'server.log').read_text()[-3000:]}")
    return proc, match.group(1)


def ask_each(url: str, model: str, prompts: list[str], max_tokens: int) -> list[tuple[float, int, str]]:
    """Send `prompts` one after another through one `openai` client; return (seconds, completion tokens, finish
    reason) of each."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    results = []
    for prompt in prompts:
        start = time.perf_counter()
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0)
        results.append((time.perf_counter() - start, answer.usage.completion_tokens, answer.choices[0].finish_reason))
    return results


def timed(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, list]:
    """Return (wall seconds, per-request results) for `prompts` spread over `clients` concurrent clients."""
    shares = [prompts[k::clients] for k in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for share in pool.map(lambda s: ask_each(url, model, s, max_tokens), shares) for r in share]
    return time.perf_counter() - start, results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summary(wall: float, results: list) -> dict:
    latencies = [r[0] for r in results]
    return {"answers_per_s": len(results) / wall, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95)}


def measure(url: str, ref: str, args: argparse.Namespace) -> tuple[list[dict], list[dict], list[int], dict]:
    """Run the warm-ups and the timed repeats; return the single and concurrent summaries of each repeat, every
    answer's completion tokens and the finish reasons counted."""
    prompts = order_prompts(args.requests)
    timed(url, ref, prompts[:1], 1, args.max_tokens)  # warm-up: first-call allocations on both paths
    timed(url, ref, prompts[:args.clients], args.clients, args.max_tokens)
    singles, concurrents, tokens, finishes = [], [], [], {}
    for k in range(args.repeats):
        single = summary(*(alone := timed(url, ref, prompts, 1, args.max_tokens)))
        concurrent = summary(*(together := timed(url, ref, prompts, args.clients, args.max_tokens)))
        singles.append(single)
        concurrents.append(concurrent)
        for _, n, finish in alone[1] + together[1]:
            tokens.append(n)
            finishes[finish] = finishes.get(finish, 0) + 1
        print(f"repeat {k + 1}: 1 client {single['answers_per_s']:.3f} answers/s (p50 {single['p50']:.2f} s, "
              f"p95 {single['p95']:.2f} s); {args.clients} clients {concurrent['answers_per_s']:.3f} answers/s "
              f"(p50 {concurrent['p50']:.2f} s, p95 {concurrent['p95']:.2f} s); ratio "
              f"{concurrent['answers_per_s'] / single['answers_per_s']:.2f}x", flush=True)
    return singles, concurrents, tokens, finishes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="prompts sent on each side of each repeat")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients on the concurrent side")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every request (greedy)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of both sides (median and spread)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="the server's --dtype")
    parser.add_argument("--model", help="serve this registered version (NAME@alias) instead of the default base")
    parser.add_argument("--tracking-uri", help="the store --model is registered in")
    args = parser.parse_args()

    import httpx

    from tasks.core.settings import apply_defaults
    from tasks.model.precision import cpu_summary

    apply_defaults()
    load_before = os.getloadavg()[0]
    print(f"CPU: {cpu_summary()}; 1-min load average {load_before:.2f}", flush=True)
    runs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    uri = args.tracking_uri if args.model else register_base(runs)
    ref = args.model or f"{NAME}@champion"
    served = (f"{ref} from {uri}" if args.model else
              "SmolLM2-135M-Instruct (packaged GGUF, converted) under a zero LoRA adapter, merged: the plain base")
    proc, url = start_server(ref, uri, runs, args.max_tokens, args.clients, args.dtype)
    try:
        singles, concurrents, tokens, finishes = measure(url, ref, args)
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ratios = [c["answers_per_s"] / s["answers_per_s"] for s, c in zip(singles, concurrents)]
    med = lambda rows, key: round(statistics.median(r[key] for r in rows), 3)  # noqa: E731
    load_after = os.getloadavg()[0]
    result = {"ratio": round(statistics.median(ratios), 2), "ratio_min": round(min(ratios), 2),
              "ratio_max": round(max(ratios), 2), "single_answers_per_s": med(singles, "answers_per_s"),
              "concurrent_answers_per_s": med(concurrents, "answers_per_s"), "single_p50_s": med(singles, "p50"),
              "single_p95_s": med(singles, "p95"), "concurrent_p50_s": med(concurrents, "p50"),
              "concurrent_p95_s": med(concurrents, "p95"), "repeats": args.repeats, "requests": args.requests,
              "clients": args.clients, "max_tokens": args.max_tokens,
              "completion_tokens_mean": round(statistics.mean(tokens), 1), "finish_reasons": finishes,
              "largest_batch": health["largest_batch"],
              "server": {k: health[k] for k in ("stats", "model_seconds", "prefix_cache")},
              "served": served, "dtype": f"{health['dtype']} (--dtype {args.dtype})", "cpu": cpu_summary(),
              "load_avg": [round(load_before, 2), round(load_after, 2)]}
    print(f"{args.clients} clients: {result['ratio']}x one client's answers/s (spread {result['ratio_min']}-"
          f"{result['ratio_max']}; goal >= 4); 1-min load average {load_before:.2f} -> {load_after:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
