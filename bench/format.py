"""Format benchmark: render, mask and tokenize n GSM8K-sized conversations, as the format task does.

Usage: .venv/bin/python bench/format.py [--rows 100000] [--num-proc 0] [--paths fast,hf,jinja]

The conversations are GSM8K train rows (../shared/data/gsm8k_train.jsonl, or $GSM8K_JSONL) with a system turn,
repeated to n rows and varied (each copy's question gets its own number), so no text repeats and a cache cannot
help. Timed: the format task's encode step (tasks.formatting.encoding.encode_all: rendering with the spans the masks
need, tokenization, masks, the check of sampled rows against Jinja and HF) with the default base model's tokenizer and
template, as the format task spreads it (chat.num_proc, 0 = auto: tokenizer threads where skeletons render the
rows). Each path in --paths is timed in the same run, so their ratios hold even on a shared machine: fast (the
format task's own choice: skeleton rendering, tasks/formatting/skeletons.py, and tiktoken where proved equal,
tasks/formatting/fast_tokenizer.py), hf (skeletons, the HF tokenizer's batched Rust encode with offsets) and jinja (two
Jinja renders per row and the HF tokenizer, in processes: the plain way). Then, unless --no-task, the whole
format task (tasks.formatting.chat_format.format_rows: reading the clean DuckDB file, encoding, the too-long rule,
writing both splits' Parquet files and the stats) on the same n rows, ingested and cleaned first (not timed;
near-duplicate dropping off, as the copies only differ in their number). It prints rows/s per path, rows per CPU second
(all threads and processes: what a busy machine does not halve), the CPU and the load average before each run; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

GSM8K = Path(os.environ.get("GSM8K_JSONL",
                            Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train.jsonl"))


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
    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.formatting.chat_format import chat_encoder
    from tasks.formatting.encoding import encode_all, parallelism
    from tasks.model.base_model import resolve_base_model
    from tasks.model.precision import cpu_summary
    from tasks.model.tokenizer import load_tokenizer

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
        out = encode_all(chosen, convos, [[1.0]] * n, num_proc=num_proc)
        seconds = time.perf_counter() - start
        how, workers = parallelism(chosen, convos, [[1.0]] * n, [None] * n, num_proc)
        result[path] = {"tokenizer": out.tokenizer, "parallelism": f"{workers} {how}", "seconds": round(seconds, 2),
                        "rows_per_s": round(n / seconds),
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


def format_task_rows_per_s(n: int, num_proc: int = 0) -> dict:
    """Return the rows/s of the whole format task (format_rows) on n GSM8K conversations, cleaned first."""
    import tempfile

    from tasks.core.config import DEFAULT_BASE_MODEL, ChatConfig, CleanConfig, DataConfig
    from tasks.data.clean import clean_database
    from tasks.data.ingest import ingest_rows
    from tasks.formatting.chat_format import format_rows
    from tasks.model.base_model import resolve_base_model

    with tempfile.TemporaryDirectory(prefix="sftflow-bench-format-") as tmp:
        d = Path(tmp)
        with (d / "gsm8k.jsonl").open("w", encoding="utf-8") as f:
            for convo in gsm8k_conversations(n):
                f.write(json.dumps({"system": convo[0]["content"], "instruction": convo[1]["content"],
                                    "output": convo[2]["content"]}) + "\n")
        ingest_rows(DataConfig(sources=[{"path": str(d / "gsm8k.jsonl")}]), d, d / "ingest.duckdb")
        clean_database(d / "ingest.duckdb", d / "clean.duckdb",
                       CleanConfig(heldout_fraction=0.01, drop_near_duplicates=False))
        model, load = resolve_base_model(DEFAULT_BASE_MODEL), os.getloadavg()[0]
        start = time.perf_counter()
        stats = format_rows(d / "clean.duckdb", model, d / "formatted", ChatConfig(max_length=1024,
                                                                                   num_proc=num_proc))
        seconds = time.perf_counter() - start
    rows = stats["accounting"]["rows_formatted"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "load_average_before": round(load, 2)}


def summary_lines(result: dict) -> list[str]:
    """Return one human-readable line per tokenizer path of a format_rows_per_s result."""
    return [f"format [{path}: {r['tokenizer']}]: {r['rows_per_s']} rows/s ({result['rows']} rows, "
            f"{r['tokens_per_row']} tokens each, {r['parallelism']}, {r['seconds']} s; "
            f"{r['rows_per_cpu_s']} rows per CPU second) on {result['cpu']}; load before {r['load_average_before']}"
            for path, r in ((p, result[p]) for p in ("fast", "hf", "jinja") if p in result)] + (
        [(f"format task end to end (read clean DuckDB, encode, write Parquet): {t['rows_per_s']} rows/s "
         f"({t['rows']} rows, {t['seconds']} s); load before {t['load_average_before']}")]
        if (t := result.get("task")) else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=0)
    parser.add_argument("--paths", default="fast,hf,jinja",
                        help="comma-separated: fast (the format task's choice), hf, jinja (the plain way)")
    parser.add_argument("--no-task", action="store_true", help="skip timing the whole format task")
    args = parser.parse_args()
    result = format_rows_per_s(args.rows, args.num_proc, tuple(args.paths.split(",")))
    if not args.no_task:
        result["task"] = format_task_rows_per_s(args.rows, args.num_proc)
    for line in summary_lines(result):
        print(line)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
