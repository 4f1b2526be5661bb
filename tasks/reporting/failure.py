"""The flow's failure hook: when a pipeline run fails (or crashes), say which step failed, why (one line), what the run
had produced, and the exact command that reruns that step alone, in `runs/<run-id>/failure.md` and in a Prefect
markdown artifact (key `failure`). The hook never raises: a failing report must not hide the failure it reports.

The run directory is found from the flow run's parameters (config_path, overrides, run_id); a run without a given
id is found by the `flow_run_id` file the flow writes into its directory. The failed step is the task run of this
flow run in a FAILED state, named `STEP[...]` as `sftflow task` spells the step.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.config import STEP_NAMES
from tasks.core.errors import SftflowError
from tasks.core.redact import redact

FAILURE_FILE = "failure.md"
TRACEBACK_FILE = "failure-traceback.txt"  # the full traceback, for debugging: failure.md and the CLI show one line
FAILURE_ARTIFACT = "failure"
DEFAULT_RUNS_DIR = Path("runs")  # `sftflow task --runs-dir`'s default

log = logging.getLogger("sftflow.failure")


@dataclass
class FailureReport:
    """What one failed run tells its user: the step, the reason, what exists, how to rerun."""

    flow_run_id: str
    step: str | None
    reason: str
    run_dir: Path | None = None
    produced: list[tuple[str, int]] = field(default_factory=list)
    command: str = ""
    traceback: str = ""

    def line(self) -> str:
        """Return the one-line summary: step, reason, where the partial outputs are and the rerun command."""
        where = f"step {self.step} failed" if self.step else "the run failed outside any step"
        kept = f"; outputs so far in {self.run_dir}" if self.run_dir else ""
        trace = f"; traceback in {self.run_dir / TRACEBACK_FILE}" if self.traceback and self.run_dir else ""
        rerun = f"; rerun: {self.command}" if self.command else ""
        return redact(f"{where}: {self.reason}{kept}{trace}{rerun}")  # an error may quote a URI with credentials

    def markdown(self) -> str:
        """Return failure.md's text (also the artifact's)."""
        lines = ["# Run failed", "", f"- **Step:** `{self.step}`" if self.step else "- **Step:** none (the flow "
                 "itself failed, before or between steps)", f"- **Why:** {self.reason}",
                 f"- **Flow run:** `{self.flow_run_id}`"]
        if self.command:
            lines.append(f"- **Rerun it alone:** `{self.command}`")
        if self.traceback and self.run_dir is not None:
            lines.append(f"- **Traceback:** `{TRACEBACK_FILE}` in the run directory (for debugging)")
        if self.run_dir is not None:
            lines += ["", f"## What the run had produced (`{self.run_dir}`)", ""]
            lines += ["| path | size |", "|---|---|", *(f"| `{name}` | {human_size(size)} |"
                                                     for name, size in self.produced)] if self.produced else \
                ["nothing yet"]
        return redact("\n".join(lines) + "\n")


LAST: dict[str, FailureReport] = {}  # by flow run id, in this process: the CLI prints the line of the one it ran


def human_size(n: int) -> str:
    """Return a byte count as B/KiB/MiB/GiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def tree_size(path: Path) -> int:
    """Return the bytes of a file, or of every file under a directory (unreadable entries count 0)."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def produced(run_dir: Path) -> list[tuple[str, int]]:
    """Return the run directory's top-level files and directories (a directory with a trailing /) and sizes."""
    if not run_dir.is_dir():
        return []
    return [(p.name + ("/" if p.is_dir() else ""), tree_size(p)) for p in sorted(run_dir.iterdir())
            if p.name not in (FAILURE_FILE, TRACEBACK_FILE)]


def one_line(error: BaseException | None, fallback: str) -> str:
    """Return the exception's message as one line (a user error as it is; anything else with its type)."""
    if error is None:
        return fallback.strip().splitlines()[0] if fallback.strip() else "unknown error"
    text = " ".join(str(error).split())
    if isinstance(error, SftflowError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def step_of(task_run_name: str) -> str | None:
    """Return the `sftflow task` step a task run name belongs to (`train[qlora r=16, 40 steps]` -> train); Prefect's
    default names (`clean-0a1`) map to their task; None when no step has that name."""
    name = task_run_name.split("[")[0].strip()
    if name in STEP_NAMES:
        return name
    bare = re.sub(r"-[0-9a-f]{1,8}$", "", name)
    return bare if bare in STEP_NAMES else None


def failed_task_run(flow_run_id: str, wait_s: float = 5.0) -> Any | None:
    """Return this flow run's failed task run that is a pipeline step (the latest, if several), else None.

    The API learns task states from events, so the failed state may land a moment after the flow's: ask again for up
    to `wait_s` seconds.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter, TaskRunFilterState
    from prefect.client.schemas.filters import TaskRunFilterStateType as StateType
    from prefect.client.schemas.objects import StateType as Type

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(
                    type=StateType(any_=[Type.FAILED, Type.CRASHED]))))
            steps = [r for r in runs if step_of(r.name)]
            if steps or time.monotonic() > deadline:
                return max(steps, key=lambda r: r.end_time or r.expected_start_time or 0, default=None)
            time.sleep(0.25)


def run_directory(parameters: dict, flow_run_id: str) -> tuple[Path | None, Path | None]:
    """Return (runs_dir, run directory) of the failed flow run: from its run_id parameter, else the directory whose
    flow_run_id file names it; (None, None) when the config itself did not load."""
    from tasks.core.config import load_config

    try:
        cfg = load_config(Path(parameters.get("config_path") or "configs/default.yaml"),
                          parameters.get("overrides") or [])
    except SftflowError:
        return None, None
    runs_dir = cfg.runs_dir
    if parameters.get("run_id"):
        return runs_dir, runs_dir / parameters["run_id"]
    for marker in sorted(runs_dir.glob("*/flow_run_id"), key=lambda p: p.stat().st_mtime, reverse=True):
        if marker.read_text(encoding="utf-8").strip() == flow_run_id:
            return runs_dir, marker.parent
    return runs_dir, None


def rerun_command(step: str | None, runs_dir: Path | None, run_dir: Path | None, parameters: dict) -> str:
    """Return the command that reruns the failed step alone (`sftflow task STEP --run ID [--runs-dir DIR]`), or the
    whole run when no step (or no saved config, which `sftflow task` reads) is there."""
    if step and run_dir is not None and (run_dir / "config.yaml").is_file():
        runs = [] if Path(runs_dir) == DEFAULT_RUNS_DIR else ["--runs-dir", str(runs_dir)]
        return shlex.join(["sftflow", "task", step, "--run", run_dir.name, *runs])
    args = ["sftflow", "run", str(parameters.get("config_path") or "configs/default.yaml")]
    if run_dir is not None:
        args += ["--run-id", run_dir.name]
    for override in parameters.get("overrides") or []:
        args += ["--set", override]
    return shlex.join(args + ["--force"] * bool(parameters.get("force")))  # a forced run is gated again otherwise


def flow_error(state: Any) -> BaseException | None:
    """Return the exception the failed flow run raised, if it can be had."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 -- a result that cannot be read: fall back to the state message
        return None
    return error if isinstance(error, BaseException) else None


def build_report(flow_run: Any, state: Any) -> FailureReport:
    """Return the failure report of `flow_run` ended in `state`."""
    flow_run_id, parameters = str(flow_run.id), dict(flow_run.parameters or {})
    runs_dir, run_dir = run_directory(parameters, flow_run_id)
    task_run = failed_task_run(flow_run_id, wait_s=5.0 if runs_dir else 0.0)  # no config: no step ran
    step = step_of(task_run.name) if task_run else None
    fallback = (task_run.state.message if task_run and task_run.state else None) or state.message or ""
    error = flow_error(state)
    trace = "".join(traceback.format_exception(error)) if error is not None and error.__traceback__ else ""
    return FailureReport(flow_run_id, step, one_line(error, fallback), run_dir,
                         produced(run_dir) if run_dir else [], rerun_command(step, runs_dir, run_dir, parameters),
                         trace)


def step_failure(step: str, runs_dir: Path, run_dir: Path, error: BaseException) -> FailureReport:
    """Return the report of `sftflow task STEP` failing with `error` (not the user's: a bug, an outage that outlived
    the retries), its traceback saved to the run directory's failure-traceback.txt; the line is what the CLI prints."""
    report = FailureReport("", step, one_line(error, ""), run_dir, [], rerun_command(step, runs_dir, run_dir, {}),
                           "".join(traceback.format_exception(error)))
    (run_dir / TRACEBACK_FILE).write_text(redact(report.traceback), encoding="utf-8")
    return report


def publish(report: FailureReport) -> None:
    """Write failure.md into the run directory (when there is one) and the `failure` markdown artifact."""
    text = report.markdown()
    if report.run_dir is not None and report.run_dir.is_dir():
        (report.run_dir / FAILURE_FILE).write_text(text, encoding="utf-8")
        if report.traceback:
            (report.run_dir / TRACEBACK_FILE).write_text(redact(report.traceback), encoding="utf-8")
    create_failure_artifact(report.flow_run_id, text, report)


def create_failure_artifact(flow_run_id: str, text: str, report: FailureReport) -> None:
    """Create the markdown artifact on the failed flow run itself (the hook runs after its context closed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    with get_client(sync_client=True) as client:
        client.create_artifact(ArtifactCreate(key=FAILURE_ARTIFACT, type="markdown", data=text,
                                              description=report.line()[:500], flow_run_id=flow_run_id))


def report_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect on_failure/on_crashed hook: write failure.md and the `failure` artifact; never raise."""
    logger = run_logger(flow, flow_run)
    try:
        report = build_report(flow_run, state)
        LAST[report.flow_run_id] = report
        publish(report)
        logger.error("%s (report: %s)", report.line(),
                     report.run_dir / FAILURE_FILE if report.run_dir else f"artifact {FAILURE_ARTIFACT!r}")
    except Exception as e:  # noqa: BLE001 -- the hook must never raise
        logger.warning("the failure report could not be written: %s: %s", type(e).__name__, e)


def run_logger(flow: Any, flow_run: Any) -> logging.Logger | logging.LoggerAdapter:
    """Return the flow run's Prefect logger (console and UI), else the standard `sftflow.failure` logger."""
    try:
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run, flow)
    except Exception:  # noqa: BLE001
        return log


def failure_line(flow_run_id: str | None = None) -> str | None:
    """Return the one-line summary of the failure this process reported (of `flow_run_id`, else the latest)."""
    if flow_run_id is not None:
        report = LAST.get(str(flow_run_id))
    else:
        report = next(reversed(LAST.values()), None)
    return report.line() if report else None
