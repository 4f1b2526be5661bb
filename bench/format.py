"""Format benchmark: the whole format task on a mixed data set, cold and warm; and its encode step by tokenizer path.

Usage: .venv/bin/python bench/format.py [--rows 100000] [--repeats 3] [--paths fast,hf,jinja] [--profile]

The data: --rows distinct conversations of several shapes (`mixed_conversations`): system + question + answer, a
question and answer with no system prompt, multi-turn chats of two or three exchanges, rows in other scripts
(accented Latin, Cyrillic, Greek, Chinese, Japanese, Arabic, emoji), and list-style answers. Their text comes from
GSM8K train rows (../shared/data/gsm8k_train.jsonl, or $GSM8K_JSONL) when present, else from the built-in order
generator (tasks/data/synth.py), and every row gets its own number, so no text repeats and no cache helps. The rows
are ingested and cleaned once (not timed; near-duplicate dropping off, as the copies differ only in their numbers).

Timed, --repeats times each, alternating, each run in a fresh process (its imports, ~4 s, done first, untimed, by
loading the tokenizer once):
- cold: the whole format task (tasks.formatting.chat_format.format_rows: reading the clean DuckDB file, loading the
  tokenizer, proving the tiktoken encoder, encoding, the too-long rule, writing both splits' Parquet files and the
  stats) with an empty SFTFLOW_CACHE, so the tokenizer proof (tasks/formatting/fast_tokenizer.py) is done again, as
  on a machine's first run;
- warm: the same with the proof already in SFTFLOW_CACHE, as on every later run.
Then, unless --paths is empty, the encode step alone (tasks.formatting.encoding.encode_all) in this process, per
tokenizer path, --repeats times each: fast (the task's own choice: skeleton rendering and tiktoken where proved
equal), hf (skeletons and the HF tokenizer's batched encode) and jinja (two Jinja renders per row and the HF
tokenizer, in processes: the plain way). Rows/s per CPU second counts every thread and process. `--profile` runs one
more cold task under cProfile and prints where its time goes. Medians and spreads (min-max) are printed with the CPU
and the load before each run; the last line is one JSON object: {"cold_rows_per_s", "warm_rows_per_s", "goal_met",
"rows", "tokens_per_row", "shapes", "paths", "cpu", ...}. Goal: the whole task at >= 10,000 rows/s cold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K = Path(os.environ.get("GSM8K_JSONL", ROOT.parent / "shared" / "data" / "gsm8k_train.jsonl"))
GOAL = 10_000
SYSTEM = ["Solve the math problem step by step.", "You are a careful assistant. Answer briefly.",
          "Tu es un assistant serviable. Réponds en français si on te parle français."]
FOREIGN = ["Grüße aus München: die Straße ist gesperrt, bitte über die Brücke fahren.",
           "Ça coûte 12,50 € — c'est déjà payé, merci beaucoup !",
           "Съешь же ещё этих мягких французских булок да выпей чаю.",
           "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
           "我们明天下午三点在会议室见面，请带上报告。",
           "東京駅から新幹線で大阪まで約二時間半かかります。",
           "مرحبا، كيف يمكنني مساعدتك اليوم؟",
           "Leistung 🚀 und Qualität ✅ — beides zählt 💯.",
           "Zażółć gęślą jaźń; Příliš žluťoučký kůň úpěl ďábelské ódy."]
SHAPES = ("system_single", "single", "multi_turn", "foreign", "list_answer")


def source_pairs(n: int) -> list[tuple[str, str]]:
    """Return n (question, answer) pairs: GSM8K rows where the file is there, else generated orders."""
    if GSM8K.is_file():
        rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(rows[i % len(rows)]["question"], rows[i % len(rows)]["answer"]) for i in range(n)]
    from tasks.data.synth import make_order

    rng = random.Random(0)
    return [(f"{r['instruction']}\n\n{r['input']}", r["output"]) for r in (make_order(rng) for _ in range(n))]


def mixed_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Return n distinct conversations of the SHAPES, in a seeded mix (each row numbered so no text repeats)."""
    rng, pairs = random.Random(seed), source_pairs(n + 2)
    out = []
    for i in range(n):
        (q, a), shape = pairs[i], rng.choices(SHAPES, weights=(30, 20, 20, 20, 10))[0]
        q = f"Problem {i}: {q}"
        if shape == "system_single":
            convo = [{"role": "system", "content": rng.choice(SYSTEM)}, {"role": "user", "content": q},
                     {"role": "assistant", "content": a}]
        elif shape == "single":
            convo = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif shape == "multi_turn":
            (q2, a2), (q3, a3) = pairs[i + 1], pairs[i + 2]
            convo = [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                     {"role": "user", "content": f"And this one ({i}b)? {q2}"}, {"role": "assistant", "content": a2}]
            if rng.random() < 0.5:
                convo += [{"role": "user", "content": f"Last one, {i}c: {q3}"}, {"role": "assistant", "content": a3}]
        elif shape == "foreign":
            said = " ".join(rng.sample(FOREIGN, 3))
            convo = [{"role": "user", "content": f"{q}\n{said}"},
                     {"role": "assistant", "content": f"{rng.choice(FOREIGN)}\n{a}"}]
        else:
            steps = [s for s in a.split("\n") if s.strip()]
            convo = [{"role": "system", "content": rng.choice(SYSTEM)}, {"role": "user", "content": q},
                     {"role": "assistant", "content": "\n".join(f"- {s}" for s in steps)}]
        out.append(convo)
    return out


def prepare(work: Path, n: int) -> Path:
    """Write the mixed conversations as `messages` JSONL, ingest and clean them (not timed); return the clean DB."""
    from tasks.core.config import CleanConfig, DataConfig
    from tasks.data.clean import clean_database
    from tasks.data.ingest import ingest_rows

    with (work / "mixed.jsonl").open("w", encoding="utf-8") as f:
        for convo in mixed_conversations(n):
            f.write(json.dumps({"messages": convo}, ensure_ascii=False) + "\n")
    ingest_rows(DataConfig(sources=[{"path": str(work / "mixed.jsonl")}]), work, work / "ingest.duckdb")
    clean_database(work / "ingest.duckdb", work / "clean.duckdb",
                   CleanConfig(heldout_fraction=0.01, drop_near_duplicates=False, max_chars=20_000))
    return work / "clean.duckdb"


def task_side(clean_db: Path, model_dir: str, out: Path, profile: bool) -> dict:
    """Time format_rows once in this process (SFTFLOW_CACHE as the caller set it); return seconds and rows."""
    from tasks.core.config import ChatConfig
    from tasks.formatting.chat_format import format_rows
    from tasks.model.tokenizer import load_tokenizer

    load_tokenizer(model_dir)  # the imports (transformers, torch: ~4 s), untimed; the tokenizer proof is not touched
    cfg = ChatConfig(max_length=2048)
    start, cpu = time.perf_counter(), time.process_time()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        stats = prof.runcall(format_rows, clean_db, model_dir, out, cfg)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    else:
        stats = format_rows(clean_db, model_dir, out, cfg)
    seconds = time.perf_counter() - start
    tokens = sum(stats[s]["tokens_mean"] * stats[s]["rows"] for s in ("train", "heldout"))
    rows = stats["accounting"]["rows_formatted"]
    return {"seconds": round(seconds, 3), "rows": rows, "cpu_s": round(time.process_time() - cpu, 2),
            "tokens_per_row": round(tokens / max(rows, 1), 1),
            "parts": stats["template"]["answers_in_rows_of_their_own"]}


def run_task(clean_db: Path, model_dir: str, cache: Path, out: Path, profile: bool = False) -> dict:
    """Run task_side in a fresh process with SFTFLOW_CACHE=cache; return its JSON line with the load before."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--side", "task", "--clean-db", str(clean_db), "--model-dir", model_dir,
           "--out", str(out), *(["--profile"] if profile else [])]
    proc = subprocess.run(cmd, env=dict(os.environ, SFTFLOW_CACHE=str(cache)), capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        sys.exit(f"format task failed:\n{proc.stderr[-4000:]}")
    if profile:
        print(proc.stderr[-12000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": round(load, 2)}


def children_cpu_s() -> float:
    """Return the CPU seconds (user + system) of this process's finished child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def encode_paths(convos: list[list[dict]], model_dir: str, paths: list[str], repeats: int) -> dict:
    """Return, per tokenizer path, the encode step's rows/s (median, spread) and rows per CPU second."""
    from tasks.formatting.chat_format import chat_encoder
    from tasks.formatting.encoding import encode_all, parallelism
    from tasks.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    encoder = chat_encoder(tokenizer, tokenizer.chat_template)
    n, weights, result = len(convos), [[1.0] * len(c) for c in convos], {}
    for path in paths:
        chosen = {"fast": encoder, "hf": encoder.without_fast(),
                  "jinja": encoder.without_fast().without_skeletons()}[path]
        rates, per_cpu, loads = [], [], []
        for _ in range(repeats):
            loads.append(round(os.getloadavg()[0], 2))
            start, cpu_start, children_start = time.perf_counter(), time.process_time(), children_cpu_s()
            out = encode_all(chosen, convos, weights)
            rates.append(n / (time.perf_counter() - start))
            per_cpu.append(n / (time.process_time() - cpu_start + children_cpu_s() - children_start))
        how, workers = parallelism(chosen, convos, weights, [None] * n, 0)
        result[path] = {"tokenizer": out.tokenizer, "parallelism": f"{workers} {how}",
                        "rows_per_s": round(statistics.median(rates)), "spread": [round(min(rates)), round(max(rates))],
                        "rows_per_cpu_s": round(statistics.median(per_cpu)), "load_before": loads}
    return result


def median_spread(runs: list[dict]) -> dict:
    """Return the median rows/s of task runs, their spread and loads."""
    rates = [r["rows"] / r["seconds"] for r in runs]
    return {"rows_per_s": round(statistics.median(rates)), "spread": [round(min(rates)), round(max(rates))],
            "seconds": [r["seconds"] for r in runs], "load_before": [r["load_before"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", default="fast,hf,jinja", help="encode-step paths to time ('' for none)")
    parser.add_argument("--profile", action="store_true", help="one more cold task under cProfile")
    parser.add_argument("--side", choices=("task",), help=argparse.SUPPRESS)
    parser.add_argument("--clean-db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from tasks.core.settings import apply_defaults

    apply_defaults()  # sftflow's environment: OpenMP threads sleep while they wait (a shared machine)
    if args.side == "task":
        print(json.dumps(task_side(args.clean_db, args.model_dir, args.out, args.profile)))
        return
    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_base_model
    from tasks.model.precision import cpu_summary

    model_dir = resolve_base_model(DEFAULT_BASE_MODEL)  # converted once, outside every timed run
    print(f"CPU: {cpu_summary()}; load {os.getloadavg()[0]:.2f}; source text: {GSM8K if GSM8K.is_file() else 'orders'}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="sftflow-bench-format-") as tmp:
        work = Path(tmp)
        clean_db = prepare(work, args.rows)
        warm_cache = work / "warm-cache"
        run_task(clean_db, model_dir, warm_cache, work / "out-prime")  # proves once into the warm cache, untimed
        cold, warm = [], []
        for k in range(args.repeats):
            cold.append(run_task(clean_db, model_dir, work / f"cold-cache-{k}", work / f"out-cold-{k}"))
            warm.append(run_task(clean_db, model_dir, warm_cache, work / f"out-warm-{k}"))
            print(f"[{k + 1}/{args.repeats}] cold {cold[-1]['seconds']} s, warm {warm[-1]['seconds']} s "
                  f"({cold[-1]['rows']} rows; load before {cold[-1]['load_before']}, {warm[-1]['load_before']})",
                  flush=True)
        if args.profile:
            run_task(clean_db, model_dir, work / "cold-cache-profile", work / "out-profile", profile=True)
    paths = [p for p in args.paths.split(",") if p]
    convos = mixed_conversations(args.rows)
    shapes = dict.fromkeys(SHAPES, 0)
    for convo in convos:
        shapes[shape_of(convo)] += 1
    result = {"rows": cold[0]["rows"], "tokens_per_row": cold[0]["tokens_per_row"], "shapes": shapes,
              "cold": median_spread(cold), "warm": median_spread(warm),
              "paths": encode_paths(convos, model_dir, paths, args.repeats) if paths else {}, "cpu": cpu_summary()}
    result.update(cold_rows_per_s=result["cold"]["rows_per_s"], warm_rows_per_s=result["warm"]["rows_per_s"],
                  goal_met=result["cold"]["rows_per_s"] >= GOAL)
    for line in summary_lines(result):
        print(line)
    print(json.dumps(result))


def shape_of(convo: list[dict]) -> str:
    """Return which of SHAPES a mixed conversation is."""
    if len(convo) > 3:
        return "multi_turn"
    if convo[-1]["content"].startswith("- "):
        return "list_answer"
    if convo[0]["role"] == "system":
        return "system_single"
    return "foreign" if not convo[0]["content"].isascii() else "single"


def summary_lines(result: dict) -> list[str]:
    """Return the human-readable summary of a result."""
    lines = [f"format task, {result['rows']:,} mixed rows ({result['tokens_per_row']} tokens each; "
             f"{result['shapes']}):"]
    for kind in ("cold", "warm"):
        r = result[kind]
        lines.append(f"  {kind}: {r['rows_per_s']:,} rows/s median of {len(r['seconds'])} (spread {r['spread']}; "
                     f"seconds {r['seconds']}; load before {r['load_before']})")
    for path, r in result["paths"].items():
        lines.append(f"  encode step [{path}: {r['tokenizer']}, {r['parallelism']}]: {r['rows_per_s']:,} rows/s "
                     f"(spread {r['spread']}), {r['rows_per_cpu_s']:,} rows per CPU second; load {r['load_before']}")
    lines.append(f"goal >= {GOAL:,} rows/s cold: {'met' if result['goal_met'] else 'NOT met'} "
                 f"({result['cold_rows_per_s'] / GOAL:.2f}x the goal); CPU {result['cpu']}")
    return lines


if __name__ == "__main__":
    main()
