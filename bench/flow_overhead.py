"""Orchestration benchmark: what Prefect costs a run, a fully cached rerun, and (optionally) two trainings at once.

Usage: .venv/bin/python bench/flow_overhead.py [--config configs/default.yaml] [--repeats 3] [--model default|tiny]
                                               [--concurrency]

In one invocation, on --config (the default run, configs/default.yaml, unless told otherwise), each run in a fresh
process with its own runs_dir (no cache hit, no champion), alternating, --repeats times each:

1. direct: the pipeline's steps as plain functions (`task.fn`, no Prefect), wired by flows/steps.py in the flow's
   order with the flow's arguments (`--side direct`), imports included;
2. flow: the same run as `sftflow run CONFIG --force` (`python -m flows.cli run`), the way `make run` runs it: its
   temporary Prefect server's start, the flow and task runs, state changes and result records included.
overhead = flow - direct per pair; its median, as a share of the median direct run (the denominator is measured here,
in the same invocation: nothing is taken from an earlier run). `outside_tasks_s` (a flow run's wall time less its
task runs' Running time, from the Prefect API) is the part of Prefect's cost that does not depend on the work, so it
holds on a loaded machine where flow - direct (two runs of the work) is mostly noise.
3. the fully cached rerun of the first flow run (same run id, every cached step a hit) as `sftflow run` on the
   temporary server (what a second `make run` costs), and against a running `prefect server` (PREFECT_API_URL), each
   --repeats times;
4. with --concurrency: configs/tiny.yaml with its real base model, two `sftflow run` processes started together on
   other data (train slots from the machine: one per 2 cores), against one run alone, times two; measured once.
`--model tiny` swaps a 2-layer random llama in for the base model: a quick check of the script itself.

The CPU, the cores and the 1-minute load average before each run are printed: the figures are wall-clock on a shared
machine. The last line printed is one JSON object: {"overhead_share", "overhead_s", "direct_s", "flow_s",
"outside_tasks_s", "cached_rerun_s", "cached_rerun_server_s", ..., "config", "cpu", "load_before"}: `overhead_share`
= median(flow - direct) / median(direct). Goals: overhead <= 5% of the default run; a cached rerun as a command
<= 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT / "configs" / "default.yaml"
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_random_model(out: Path) -> Path:
    """Save the tests' 2-layer random llama with the SmolLM2 tokenizer to `out` (tasks/model/tiny_model.py)."""
    from tasks.model.tiny_model import build_tiny_model

    return build_tiny_model(out)


def direct_pipeline(config_path: Path, overrides: list[str], run_id: str) -> dict:
    """Run the flow's steps as plain functions (`task.fn`), wired as flows/sft_pipeline.py wires them (flows/steps.py),
    with no Prefect: save the config, fingerprint the sources, every step in order, the summary."""
    from flows.steps import STEPS, RunContext
    from tasks.core.config import RunPaths, dump_config, load_config
    from tasks.data.ingest import fingerprint_sources
    from tasks.reporting.report import save_config, write_summary

    started = time.time()
    cfg = load_config(config_path, overrides)
    run = RunPaths(cfg.runs_dir, run_id)
    save_config.fn(dump_config(cfg), run.config)
    context = RunContext(cfg, run, None, {"fingerprint": fingerprint_sources.fn(cfg.data)})
    for name, step in STEPS.items():
        context.hand_over(name, step.task.fn(*step.args(context)))
    return write_summary.fn(run.run_id, run.clean_report, context["evaluation"], context["registered"], None, started,
                            run.summary)


def cli_command(config: Path, overrides: list[str], run_id: str) -> list[str]:
    """Return the `sftflow run CONFIG --force` command line for `run_id` with `overrides`."""
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config), "--run-id", run_id, "--force"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def start_cli(config: Path, overrides: list[str], run_id: str, env: dict, log: Path) -> subprocess.Popen:
    """Start an `sftflow run` process writing its output to `log`."""
    return subprocess.Popen(cli_command(config, overrides, run_id), cwd=ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def run_logged(cmd: list[str], env: dict, log: Path) -> float:
    """Run `cmd` to the end, its output to `log`; return its wall seconds (fails loudly with its last output)."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def run_cli(config: Path, overrides: list[str], run_id: str, env: dict, log: Path) -> float:
    """Run one `sftflow run` to the end; return its wall seconds."""
    return run_logged(cli_command(config, overrides, run_id), env, log)


def run_direct(config: Path, overrides: list[str], env: dict, log: Path) -> float:
    """Run the direct pipeline (no Prefect) in a fresh process; return its wall seconds, imports included."""
    cmd = [sys.executable, __file__, "--side", "direct", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    return run_logged(cmd, env, log)


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
    """Time one tiny run alone, then two started together (other data each); return the times and their ratio."""
    def data(seed: int) -> str:
        return f"data.sources=[{{synthetic: {{rows: 120, seed: {seed}}}}}]"

    overrides = [*overrides, f"runs_dir={runs}"]
    alone = run_cli(TINY, [*overrides, data(11)], "alone", env, logs / "alone.log")
    start = time.perf_counter()
    procs = [start_cli(TINY, [*overrides, data(seed)], r, env, logs / f"{r}.log") for r, seed in (("pair-a", 12),
                                                                                                  ("pair-b", 13))]
    codes = [p.wait() for p in procs]
    pair = time.perf_counter() - start
    if codes != [0, 0]:
        raise SystemExit(f"a concurrent run failed: {codes}; see {logs}")
    waits = [json.loads((runs / r / "train" / "train_slot.json").read_text())["waited_s"] for r in ("pair-a", "pair-b")]
    return {"alone_s": round(alone, 1), "pair_s": round(pair, 1), "pair_vs_sequential": round(pair / (2 * alone), 3),
            "train_overlap_s": round(overlap(runs, "pair-a", "pair-b"), 1), "slot_waits_s": waits}


def median_spread(values: list[float]) -> tuple[float, list[float]]:
    """Return the median and [min, max] of `values`, rounded."""
    return round(statistics.median(values), 1), [round(min(values), 1), round(max(values), 1)]


def measure_runs(config: Path, overrides: list[str], work: Path, env: dict, repeats: int) -> dict:
    """Time direct and flow runs of `config`, alternating, `repeats` each; return the times and flow run ids."""
    logs, out = work / "logs", {"direct": [], "flow": [], "flow_run_ids": [], "load_before": []}
    for k in range(repeats):
        for side in ("direct", "flow"):
            runs_dir = work / f"{side}-runs-{k}"
            out["load_before"].append(round(os.getloadavg()[0], 2))
            if side == "direct":
                seconds = run_direct(config, [*overrides, f"runs_dir={runs_dir}"], env, logs / f"direct-{k}.log")
            else:
                seconds = run_cli(config, [*overrides, f"runs_dir={runs_dir}"], "flow", env, logs / f"flow-{k}.log")
                summary = json.loads((runs_dir / "flow" / "summary.json").read_text())
                out["flow_run_ids"].append(summary["prefect_flow_run_id"])
            out[side].append(seconds)
            print(f"[{k + 1}/{repeats}] {side}: {seconds:.1f} s (load before {out['load_before'][-1]})", flush=True)
    return out


def measure_cached(config: Path, overrides: list[str], work: Path, env: dict, repeats: int, concurrency: bool
                   ) -> dict:
    """Time the cached rerun of the first flow run as a command, on the temporary server and against a running one;
    then, if asked, two tiny runs at once."""
    logs, rerun = work / "logs", [*overrides, f"runs_dir={work / 'flow-runs-0'}"]
    ephemeral = [run_cli(config, rerun, "flow", env, logs / f"cached-ephemeral-{k}.log") for k in range(repeats)]
    server, url = start_server(env)
    try:
        served = dict(env, PREFECT_API_URL=url)
        against = [run_cli(config, rerun, "flow", served, logs / f"cached-server-{k}.log") for k in range(repeats)]
        pair = measure_concurrency(overrides, work / "pair-runs", served, logs) if concurrency else {}
    finally:
        stop_server(server)
    return {"ephemeral": ephemeral, "server": against, **pair}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT, help="the run measured (default: the default run)")
    parser.add_argument("--repeats", type=int, default=3, help="direct and flow runs each, and cached reruns")
    parser.add_argument("--model", choices=("default", "tiny"), default="default",
                        help="the config's own base model, or a 2-layer random llama (a check of the script)")
    parser.add_argument("--concurrency", action="store_true", help="also time two tiny runs at once")
    parser.add_argument("--side", choices=("direct",), help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "direct":
        direct_pipeline(args.config, args.set, "direct")
        return

    args.config = args.config.resolve()
    work = Path(tempfile.mkdtemp(prefix="sftflow-bench-flow-"))
    os.environ["SFTFLOW_HOME"] = str(work / "home")  # a throwaway Prefect home and result store
    from tasks.core.settings import apply_defaults
    from tasks.model.precision import cpu_summary

    apply_defaults()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # `make` migrates Prefect's database during setup; so does this, untimed
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database", "upgrade", "-y"], env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"cpu: {cpu_summary()}; affinity {len(os.sched_getaffinity(0))} cores; load {os.getloadavg()[0]:.2f}; "
          f"config {args.config}", flush=True)
    (work / "logs").mkdir()
    overrides = []
    if args.model == "tiny":
        overrides += [f"train.base_model={tiny_random_model(work / 'tiny-llama')}", "register.min_stop_rate=0"]
    runs = measure_runs(args.config, overrides, work, env, args.repeats)
    cached = measure_cached(args.config, overrides, work, env, args.repeats, args.concurrency)
    outside = [f - task_seconds(i) for f, i in zip(runs["flow"], runs["flow_run_ids"])]
    rerun = json.loads((work / "flow-runs-0" / "flow" / "summary.json").read_text())["prefect_flow_run_id"]
    states = task_states(rerun)
    cached["cached_tasks"], cached["tasks"] = states.count("Cached"), len(states)
    print(json.dumps(report(args, runs, cached, outside, cpu_summary())))
    kept = Path(tempfile.mkdtemp(prefix="sftflow-bench-flow-logs-"))
    shutil.copytree(work / "logs", kept, dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)


def report(args, runs: dict, cached: dict, outside: list[float], cpu: str) -> dict:
    """Print the medians, spreads and goals; return the JSON result."""
    direct_s, direct_spread = median_spread(runs["direct"])
    flow_s, flow_spread = median_spread(runs["flow"])
    overhead_s, overhead_spread = median_spread([f - d for f, d in zip(runs["flow"], runs["direct"])])
    outside_s, outside_spread = median_spread(outside)
    eph_s, eph_spread = median_spread(cached["ephemeral"])
    server_s, server_spread = median_spread(cached["server"])
    share = overhead_s / direct_s
    print(f"direct {direct_s} s {direct_spread}, flow {flow_s} s {flow_spread}: overhead {overhead_s} s "
          f"{overhead_spread} = {share:.1%} of the direct run (goal <= 5%: {'met' if share <= 0.05 else 'NOT met'}); "
          f"outside task runs {outside_s} s {outside_spread} = {outside_s / direct_s:.1%}; cached rerun as a command "
          f"{eph_s} s {eph_spread} (goal <= 15 s: {'met' if eph_s <= 15 else 'NOT met'}), against a running server "
          f"{server_s} s {server_spread}")
    if "pair_s" in cached:
        print(f"concurrency: one alone {cached['alone_s']} s; two together {cached['pair_s']} s = "
              f"{cached['pair_vs_sequential']}x one after the other; trainings overlapped "
              f"{cached['train_overlap_s']} s")
    return {"overhead_share": round(share, 4), "overhead_s": overhead_s, "overhead_spread_s": overhead_spread,
            "direct_s": direct_s, "direct_spread_s": direct_spread, "flow_s": flow_s, "flow_spread_s": flow_spread,
            "outside_tasks_s": outside_s, "outside_tasks_share": round(outside_s / direct_s, 4),
            "cached_rerun_s": eph_s, "cached_rerun_spread_s": eph_spread, "cached_rerun_server_s": server_s,
            "cached_rerun_server_spread_s": server_spread, "repeats": args.repeats,
            **{k: v for k, v in cached.items() if k not in ("ephemeral", "server")},
            "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
            "model": args.model, "cpu": cpu, "load_before": runs["load_before"],
            "load_after": round(os.getloadavg()[0], 2)}


if __name__ == "__main__":
    main()
