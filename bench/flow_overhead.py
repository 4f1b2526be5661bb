"""Orchestration benchmark: what Prefect costs the pipeline, a fully cached rerun, and two trainings at once.

Usage: .venv/bin/python bench/flow_overhead.py [--model default|tiny] [--skip-concurrency]

In one run, on configs/tiny.yaml (120 synthetic rows, 6 QLoRA steps, 8 held-out prompts) with its real base model
(SmolLM2-135M-Instruct, the converted packaged GGUF; `--model tiny` swaps in a 2-layer random llama for a quick
check of the script itself, where the work is so small that the overhead share means little):

1. direct: the flow's task functions called as plain functions (`task.fn(...)`, no Prefect), with the same
   arguments and in the same order as flows/sft_pipeline.py;
2. flow: the same pipeline through the flow, in this process, on Prefect's temporary (ephemeral) server as
   `make run` uses it (its start is part of what the flow costs), with force=True (the data gate lets it train);
   overhead = flow - direct, as a share of the flow's wall time, and that many seconds as a share of the default
   run's wall time (the README's measured `make run`, `--default-run-s`);
3. the fully cached rerun: the same run id again with force=True (every cached step a hit), in this process, then
   as `sftflow run` processes: on the temporary server (which starts for each command) and against a running
   `prefect server` (PREFECT_API_URL);
4. concurrency: two `sftflow run` processes started together on other data (against the running server, train
   slots from the machine: one per 2 cores), against one run alone, times two (one after the other).

The CPU, the cores, and the 1-minute load average (before and after) are printed: the figures are wall-clock on a
shared machine. The last line printed is one JSON object:
{"overhead_share", "cached_rerun_s", "overhead_s", "overhead_share_of_default_run", "direct_s", "flow_s",
 "cached_rerun_in_process_s", "cached_rerun_ephemeral_s", "cached_rerun_server_s", "outside_tasks_s",
 "outside_tasks_share", "cached_tasks", "tasks",
 "pair_s", "alone_s", "pair_vs_sequential", "train_overlap_s", "model", "cpu", "load_avg"}
`overhead_share` compares two runs of the work, so on a loaded machine their difference is mostly noise;
`outside_tasks_s` (the flow's wall time less its task runs' Running time, from the Prefect API) is the part of
Prefect's cost that does not depend on the work. `cached_rerun_s` is the `sftflow run` command on the temporary
server (what a second `make run` costs: the command starts that server itself, flows/temporary_server.py);
`cached_rerun_server_s` the same against a running server (a scheduled rerun: the worker talks to one);
`pair_vs_sequential` = the pair's wall time over twice the lone run's (1.0: as fast as
taking turns by hand; the unlimited pair measured 2.4 before the train slots).

Measured (AMD EPYC, 2 cores, AVX2, no native bf16; bench/README.md "Orchestration overhead"), 2026-12-01, load
0.99 -> 2.12, full: direct 116.2 s, flow 129.1 s: overhead 13.0 s = 10% of this small run, 1.4% of the default
run's 937 s; 13.4 s of the flow outside task runs; cached rerun 1.2 s in process (8 of 13 tasks cached, the other 5
uncached by design), 11.8 s as `sftflow run` on the temporary server (22.4 s before the command started it
itself), 9.9 s against a running server; one run alone 162.2 s, two together 294.2 s = 0.91x one after the
other, trainings overlapped 0 s (the second waited 91 s for the slot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs" / "tiny.yaml"
DEFAULT_RUN_S = 937  # README: `make run` on configs/default.yaml, 2 shared cores


def tiny_random_model(out: Path) -> Path:
    """Save the tests' 2-layer random llama with the SmolLM2 tokenizer to `out` (tasks/model/tiny_model.py)."""
    from tasks.model.tiny_model import build_tiny_model

    return build_tiny_model(out)


def direct_pipeline(config_path: Path, overrides: list[str], run_id: str) -> dict:
    """Run the flow's steps as plain functions (`task.fn`), same arguments and order as flows/sft_pipeline.py."""
    from tasks.core.config import RunPaths, dump_config, load_config
    from tasks.data.clean import clean
    from tasks.data.data_gate import config_digest
    from tasks.data.ingest import fingerprint_sources, ingest
    from tasks.data.validate import validate, validation_args
    from tasks.evaluate.evaluate import evaluate_adapter
    from tasks.formatting.chat_format import format_chats
    from tasks.model.modeling import prepare_base_model
    from tasks.registry.register import pipeline_tags, register_model
    from tasks.registry.registry import champion_to_compare
    from tasks.reporting.report import save_config, write_summary
    from tasks.train.monitoring import run_tracking
    from tasks.train.train import train_adapter

    started = time.time()
    cfg = load_config(config_path, overrides)
    run = RunPaths(cfg.runs_dir, run_id)
    config_file = save_config.fn(dump_config(cfg), run.config)
    data_fingerprint = fingerprint_sources.fn(cfg.data)
    base = prepare_base_model.fn(cfg.train.base_model)
    raw_db = ingest.fn(cfg.data, data_fingerprint, run.sources, run.ingest_db)
    validate.fn(*validation_args("raw", raw_db, run, cfg.validation))
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean, cfg.data.on_bad_rows)
    validate.fn(*validation_args("clean", clean_db, run, cfg.validation))
    chats = format_chats.fn(clean_db, base, run.formatted, cfg.chat, run.quarantine)
    validate.fn(*validation_args("tokenized", chats, run, cfg.validation))
    adapter = train_adapter.fn(chats, base, run.train, cfg.train, run_tracking(cfg, run.run_id))
    champion = (champion_to_compare(cfg.tracking_uri(), cfg.registry.model_name, cfg.runs_dir / "champions", adapter)
                if cfg.evaluate.compare_champion else None)
    evaluation = evaluate_adapter.fn(chats, base, adapter, run.eval, cfg.evaluate, cfg.train, champion)
    registered = register_model.fn(cfg.tracking_uri(), cfg.artifact_root(), run, base, adapter, evaluation,
                                   pipeline_tags(data_fingerprint, None, config_file, config_digest(cfg)),
                                   cfg.registry, cfg.train.method)
    return write_summary.fn(run.run_id, run.clean_report, evaluation, registered, None, started, run.summary)


def timed(fn, *args, **kwargs):
    """Return (fn's result, wall seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def cli_command(overrides: list[str], run_id: str) -> list[str]:
    """Return the `sftflow run configs/tiny.yaml --force` command line for `run_id` with `overrides`."""
    cmd = [sys.executable, "-m", "flows.cli", "run", str(TINY), "--run-id", run_id, "--force"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def start_cli(overrides: list[str], run_id: str, env: dict, log: Path) -> subprocess.Popen:
    """Start an `sftflow run` process writing its output to `log`."""
    return subprocess.Popen(cli_command(overrides, run_id), cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def run_cli(overrides: list[str], run_id: str, env: dict, log: Path) -> float:
    """Run one `sftflow run` to the end; return its wall seconds (fails loudly with its last output)."""
    start = time.perf_counter()
    proc = start_cli(overrides, run_id, env, log)
    if proc.wait() != 0:
        raise SystemExit(f"sftflow run {run_id} failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on a free loopback port; return it and its API URL once it answers."""
    from flows.temporary_server import free_port, healthy

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 240
    while time.time() < deadline:
        if healthy(url):
            return proc, url
        time.sleep(1)
    stop_server(proc)
    raise SystemExit("prefect server did not answer within 240 s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server this benchmark started (its own process group: uvicorn and the services)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def task_runs(flow_run_id: str) -> list:
    """Return the flow run's task runs as the Prefect API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def task_states(flow_run_id: str) -> list[str]:
    """Return the state names of the flow run's task runs ('Cached', 'Completed', ...)."""
    return [t.state.name for t in task_runs(flow_run_id)]


def task_seconds(flow_run_id: str) -> float:
    """Return the seconds the flow run's tasks spent Running (their bodies, as Prefect timed them)."""
    return sum(t.total_run_time.total_seconds() for t in task_runs(flow_run_id))


def overlap(runs_dir: Path, a: str, b: str) -> float:
    """Return the seconds the two runs' trainings overlapped (from their train_slot.json records)."""
    x, y = (json.loads((runs_dir / r / "train" / "train_slot.json").read_text()) for r in (a, b))
    return max(0.0, min(x["ended_at"], y["ended_at"]) - max(x["started_at"], y["started_at"]))


def measure_concurrency(overrides: list[str], runs: Path, env: dict, logs: Path) -> dict:
    """Time one run alone, then two started together (other data each); return the times and their ratio."""
    def data(seed: int) -> str:
        return f"data.sources=[{{synthetic: {{rows: 120, seed: {seed}}}}}]"

    alone = run_cli([*overrides, data(11)], "alone", env, logs / "alone.log")
    start = time.perf_counter()
    procs = [start_cli([*overrides, data(seed)], r, env, logs / f"{r}.log") for r, seed in (("pair-a", 12),
                                                                                            ("pair-b", 13))]
    codes = [p.wait() for p in procs]
    pair = time.perf_counter() - start
    if codes != [0, 0]:
        raise SystemExit(f"a concurrent run failed: {codes}; see {logs}")
    waits = [json.loads((runs / r / "train" / "train_slot.json").read_text())["waited_s"] for r in ("pair-a", "pair-b")]
    return {"alone_s": round(alone, 1), "pair_s": round(pair, 1), "pair_vs_sequential": round(pair / (2 * alone), 3),
            "train_overlap_s": round(overlap(runs, "pair-a", "pair-b"), 1), "slot_waits_s": waits}


def warm_imports() -> None:
    """Import what the stages import, so neither the direct nor the flow side pays the first imports."""
    import duckdb  # noqa: F401
    import great_expectations  # noqa: F401
    import mlflow  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "tiny"), default="default",
                        help="configs/tiny.yaml's own base model (SmolLM2-135M), or a 2-layer random llama")
    parser.add_argument("--skip-concurrency", action="store_true", help="leave out the two-runs-at-once part")
    parser.add_argument("--default-run-s", type=float, default=DEFAULT_RUN_S,
                        help="the default run's wall time the overhead is compared with")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sftflow-bench-flow-"))
    os.environ["SFTFLOW_HOME"] = str(work / "home")  # a throwaway Prefect home and result store
    from tasks.core.settings import apply_defaults
    from tasks.model.precision import cpu_summary

    apply_defaults()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # `make` migrates Prefect's database during setup; so does this, untimed
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load_before = os.getloadavg()[0]
    print(f"cpu: {cpu_summary()}; affinity {len(os.sched_getaffinity(0))} cores; load {load_before:.2f}")

    overrides = []
    if args.model == "tiny":
        model = tiny_random_model(work / "tiny-llama")
        overrides += [f"train.base_model={model}", "register.min_stop_rate=0"]
    warm_imports()
    from flows.sft_pipeline import sft_pipeline

    # each side its own store: a registered version would make the other side's evaluate score a champion too
    _, direct_s = timed(direct_pipeline, TINY, [*overrides, f"runs_dir={work / 'direct-runs'}"], "direct")
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which PipelineConfig.tracking_uri() prefers to runs_dir's
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    overrides.append(f"runs_dir={work / 'runs'}")
    print(f"direct (task.fn, no Prefect): {direct_s:.1f} s")
    summary, flow_s = timed(sft_pipeline, TINY, overrides, "flow", force=True)
    # outside any task body: the server's start, the flow run, task run creation, state changes, cache look-ups.
    # Robust to the load (unlike flow - direct, two runs of the work); it leaves out what Prefect does inside a
    # Running task (result writes), which the cached rerun below bounds.
    outside_s = flow_s - task_seconds(summary["prefect_flow_run_id"])
    print(f"flow (ephemeral server, its start included): {flow_s:.1f} s, {outside_s:.1f} s of it outside task runs")
    overhead = flow_s - direct_s
    cached, cached_in_s = timed(sft_pipeline, TINY, overrides, "flow", force=True)
    states = task_states(cached["prefect_flow_run_id"])
    print(f"cached rerun in this process: {cached_in_s:.1f} s; task states {sorted(states)}")
    logs = work / "logs"
    logs.mkdir()
    cli_eph_s = run_cli(overrides, "flow", env, logs / "cached-ephemeral.log")
    print(f"cached rerun, `sftflow run` on the temporary server: {cli_eph_s:.1f} s")
    server, url = start_server(env)
    try:
        served = dict(env, PREFECT_API_URL=url)
        cli_server_s = run_cli(overrides, "flow", served, logs / "cached-server.log")
        print(f"cached rerun, `sftflow run` against a running server: {cli_server_s:.1f} s")
        concurrency = {} if args.skip_concurrency else measure_concurrency(overrides, work / "runs", served, logs)
        if concurrency:
            print(f"concurrency: one alone {concurrency['alone_s']} s; two together {concurrency['pair_s']} s "
                  f"= {concurrency['pair_vs_sequential']}x one after the other; trainings overlapped "
                  f"{concurrency['train_overlap_s']} s; slot waits {concurrency['slot_waits_s']}")
    finally:
        stop_server(server)
    load_after = os.getloadavg()[0]
    print(f"overhead: {overhead:.1f} s = {overhead / flow_s:.1%} of the flow's wall time, "
          f"{overhead / args.default_run_s:.1%} of the default run's {args.default_run_s:.0f} s; load "
          f"{load_before:.2f} -> {load_after:.2f}")
    result = {"overhead_share": round(overhead / flow_s, 4), "cached_rerun_s": round(cli_eph_s, 1),
              "overhead_s": round(overhead, 1),
              "overhead_share_of_default_run": round(overhead / args.default_run_s, 4),
              "direct_s": round(direct_s, 1), "flow_s": round(flow_s, 1),
              "cached_rerun_in_process_s": round(cached_in_s, 1), "cached_rerun_ephemeral_s": round(cli_eph_s, 1),
              "cached_rerun_server_s": round(cli_server_s, 1), "outside_tasks_s": round(outside_s, 1),
              "outside_tasks_share": round(outside_s / flow_s, 4), "cached_tasks": states.count("Cached"),
              "tasks": len(states), **concurrency, "model": args.model, "cpu": cpu_summary(),
              "load_avg": [round(load_before, 2), round(load_after, 2)]}
    kept = Path(tempfile.mkdtemp(prefix="sftflow-bench-flow-logs-"))
    shutil.copytree(logs, kept, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"the sftflow run logs: {kept}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
