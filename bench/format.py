"""Format benchmark: render, mask and tokenize n GSM8K-sized conversations, as the format task does.

Usage: .venv/bin/python bench/format.py [--rows 100000] [--num-proc 0] [--paths fast,hf,jinja]

The conversations are GSM8K train rows (../shared/data/gsm8k_train.jsonl, or $GSM8K_JSONL) with a system turn,
repeated to n rows and varied (each copy's question gets its own number), so no text repeats and a cache cannot
help. Timed: the format task's encode step (tasks.masks.encode_all: rendering with the spans the masks need,
tokenization, masks, the check of sampled rows against Jinja and HF) with the default base model's tokenizer and
template, as the format task spreads it (chat.num_proc, 0 = auto: tokenizer threads where skeletons render the
rows). Each path in --paths is timed in the same run, so their ratios hold even on a shared machine: fast (the
format task's own choice: skeleton rendering, tasks/skeletons.py, and tiktoken where proved equal,
tasks/fast_tokenizer.py), hf (skeletons, the HF tokenizer's batched Rust encode with offsets) and jinja (two
Jinja renders per row and the HF tokenizer, in processes: the plain way). Not timed: reading the clean DuckDB
file and writing Parquet. It prints rows/s per path, rows per CPU second (all threads and processes:
what a busy machine does not halve), the CPU and the load average before each run; the last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

GSM8K = Path(os.environ.get("GSM8K_JSONL", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"))


def gsm8k_conversations(n: int) -> list[list[dict]]:
    """Return n distinct chat conversations (system, user question, assistant answer) made from GSM8K rows."""
    rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[{"role": "system", "content": "Solve the math problem step by step."},
             {"role": "user", "content": f"Problem {i}: {rows[i % len(rows)]['question']}"},
             {"role": "assistant", "content": rows[i % len(rows)]["answer"]}] for i in range(n)]


def children_cpu_s() -> float:
    """Return the CPU seconds (user + system) of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def format_rows_per_s(n: int = 100_000, num_proc: int = 0, paths: tuple[str, ...] = ("fast", "hf")) -> dict:
    """Return the rows/s of the format task's encode step on n GSM8K conversations per tokenizer path, with the
    tokenizer each path used, the CPU and the load."""
    from tasks.base_model import resolve_base_model
    from tasks.chat_format import chat_encoder, load_tokenizer
    from tasks.config import DEFAULT_BASE_MODEL
    from tasks.masks import encode_all, parallelism
    from tasks.precision import cpu_summary

    tokenizer = load_tokenizer(resolve_base_model(DEFAULT_BASE_MODEL))
    encoder = chat_encoder(tokenizer, tokenizer.chat_template)
    convos = gsm8k_conversations(n)
    result = {"rows": n, "cpu": cpu_summary(),
              "cores_available": len(os.sched_getaffinity(0))}
    for path in paths:
        load = os.getloadavg()[0]
        start, cpu_start, children_start = time.perf_counter(), time.process_time(), children_cpu_s()
        chosen = {"fast": encoder, "hf": encoder.without_fast(),
                  "jinja": encoder.without_fast().without_skeletons()}[path]
        out = encode_all(chosen, convos, [[1.0]] * n, check_prompts=False, num_proc=num_proc)
        seconds = time.perf_counter() - start
        how, workers = parallelism(chosen, convos, [[1.0]] * n, num_proc)
        result[path] = {"tokenizer": out.tokenizer, "parallelism": f"{workers} {how}", "seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
                        "tokens_per_row": round(sum(len(ids) for ids in out.ids) / n, 1),
                        "load_average_before": round(load, 2),
                        "parent_cpu_s": round(time.process_time() - cpu_start, 2)}
        # CPU seconds of every thread and worker process: rows per CPU second is what the load does not halve
        cpu = time.process_time() - cpu_start + children_cpu_s() - children_start
        result[path].update(cpu_s=round(cpu, 2), rows_per_cpu_s=round(n / cpu))
    for other in ("hf", "jinja"):
        if "fast" in result and other in result:
            result[f"fast_over_{other}"] = round(result["fast"]["rows_per_s"] / result[other]["rows_per_s"], 2)
    return result


def summary_lines(result: dict) -> list[str]:
    """Return one human-readable line per tokenizer path of a format_rows_per_s result."""
    return [f"format [{path}: {r['tokenizer']}]: {r['rows_per_s']} rows/s ({result['rows']} rows, "
            f"{r['tokens_per_row']} tokens each, {r['parallelism']}, {r['seconds']} s; "
            f"{r['rows_per_cpu_s']} rows per CPU second) on {result['cpu']}; load before {r['load_average_before']}"
            for path, r in ((p, result[p]) for p in ("fast", "hf", "jinja") if p in result)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=0)
    parser.add_argument("--paths", default="fast,hf,jinja",
                        help="comma-separated: fast (the format task's choice), hf, jinja (the plain way)")
    args = parser.parse_args()
    result = format_rows_per_s(args.rows, args.num_proc, tuple(args.paths.split(",")))
    for line in summary_lines(result):
        print(line)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
