"""`sftflow` command line: run the whole pipeline or one step of an earlier run, diagnose a run, and manage the
registry's @champion (promote, rollback, models), with one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from tasks.core.config import STEP_NAMES  # no Prefect import: settings are applied first
from tasks.core.errors import ConfigError, SftflowError, StepFailed
from tasks.core.settings import apply_defaults, shell_exports

DEFAULT_CONFIG = Path("configs/default.yaml")
STEPS = STEP_NAMES


class HideUserErrorTracebacks(logging.Filter):
    """Drop the traceback from log records about a user error (or, with `every`, about any error: `sftflow run`'s
    failure hook keeps it in runs/<id>/failure-traceback.txt): the CLI prints it as one line instead."""

    def __init__(self, every: bool = False):
        super().__init__()
        self.every = every

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (self.every or isinstance(record.exc_info[1], SftflowError)):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_errors(every_traceback: bool = False) -> None:
    """Filter the loggers Prefect's engines report failures on (filters on loggers survive its logging re-setup)."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(HideUserErrorTracebacks(every_traceback))


def registry_commands(sub) -> None:
    """Add `promote`, `rollback` and `models`: the MLflow registry's @champion by hand, and its versions."""
    promote = sub.add_parser("promote", help="give a registered version @champion by hand (who and why recorded; "
                                             "rollback returns to the champion before it)")
    promote.add_argument("name", help="registered model name, e.g. sftflow-orders")
    promote.add_argument("version", help="version number")
    promote.add_argument("--reason", required=True, help="why (kept in the version's tags)")
    rollback = sub.add_parser("rollback", help="move @champion back to the previous champion (recorded)")
    rollback.add_argument("name", help="registered model name")
    rollback.add_argument("--reason", default="", help="why (kept in both versions' tags)")
    models = sub.add_parser("models", help="list a registered model's versions with aliases, scores and gate "
                                           "decisions")
    models.add_argument("name", help="registered model name")
    for p in (promote, rollback, models):
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the sqlite "
                                              "store in the config's runs_dir)")
        p.add_argument("--runs-dir", type=Path, help="the runs_dir whose mlflow.db to use")
        p.add_argument("--config", type=Path, help="config whose store to use (default configs/default.yaml)")


def store_uri(args: argparse.Namespace) -> str:
    """Return the MLflow store a registry command works on: --tracking-uri, --runs-dir, else the one `sftflow run`
    uses with the config (configs/default.yaml: runs/mlflow.db, or MLFLOW_TRACKING_URI)."""
    import os

    from tasks.core.config import load_config

    if args.tracking_uri:
        return args.tracking_uri
    if args.runs_dir:
        return f"sqlite:///{(args.runs_dir / 'mlflow.db').resolve()}"
    if args.config or DEFAULT_CONFIG.is_file():
        return load_config(args.config or DEFAULT_CONFIG).tracking_uri()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('runs/mlflow.db').resolve()}"


def registry_command(args: argparse.Namespace) -> str:
    """Run promote, rollback or models on the store; return what to print."""
    from tasks.registry import registry

    uri = store_uri(args)
    if args.command == "promote":
        return registry.promote_version(uri, args.name, args.version, args.reason)
    if args.command == "rollback":
        return registry.rollback_champion(uri, args.name, args.reason)
    return registry.list_versions(uri, args.name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Return the parsed command line."""
    parser = argparse.ArgumentParser(prog="sftflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline")
    run.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--run-id", help="name the run (re-using an id resumes it: finished steps are cache hits)")
    run.add_argument("--force", action="store_true", help="train even when the data gate finds the sources and the "
                                                          "config unchanged since the last registered version")
    run.add_argument("--refresh", action="store_true", help="rerun every step, ignoring cached results")
    run.add_argument("--refresh-from", choices=STEPS, metavar="STEP",
                     help="rerun STEP and every step after it, ignoring their cached results (steps: "
                          f"{', '.join(STEPS)})")
    run.add_argument("--until", metavar="STEP",
                     help="stop after STEP (e.g. format or validate-tokens: the formatted splits, the reports and the "
                          "quarantine written, nothing trained); the same --run-id then goes on from there")
    task = sub.add_parser("task", help="re-run one step on an earlier run's outputs")
    task.add_argument("step", choices=STEPS)
    task.add_argument("--run", required=True, dest="run_id", help="run id (a directory under runs_dir)")
    task.add_argument("--runs-dir", type=Path, default=Path("runs"))
    task.add_argument("--inspect", type=int, default=0, metavar="N",
                      help="format only: then print N formatted rows with the supervised tokens in [[…]] (count)")
    diagnose = sub.add_parser("diagnose", help="diagnose an earlier run's training curve from its saved history "
                                               "(overfitting, underfitting, memorisation, spikes, nan/inf)")
    diagnose.add_argument("--run", required=True, dest="run_id", help="run id (a directory under runs_dir)")
    diagnose.add_argument("--runs-dir", type=Path, default=Path("runs"))
    registry_commands(sub)
    from tasks.serving.serve import add_serve_arguments

    add_serve_arguments(sub.add_parser("serve", help="serve a registered version (NAME@champion or NAME/VERSION) "
                                                     "through the OpenAI chat-completions API (/v1/chat/completions), "
                                                     "on 127.0.0.1 unless --host says otherwise"))
    sub.add_parser("env", help="print sftflow's environment as shell exports: eval \"$(sftflow env)\" before running "
                               "prefect or mlflow commands by hand, so they use the same stores")
    for p in (run, task):
        p.add_argument("--set", action="append", default=[], dest="overrides", metavar="SECTION.FIELD=VALUE",
                       help="override a config value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    if getattr(args, "inspect", 0) and args.step != "format":
        parser.error("--inspect works with the format step only")
    return args


def open_mlflow(tracking_uri: str) -> None:
    """Import MLflow and open its stores, which every run needs (register always runs; the first client of a sqlite
    store checks its schema, ~1.4 s): while a temporary Prefect server boots on another core, this costs nothing.
    A sqlite store that does not exist yet is left to the run to create (a run that stops at bad data makes none)."""
    from mlflow import MlflowClient

    from tasks.core.config import absent_sqlite_store

    if absent_sqlite_store(tracking_uri):
        return
    MlflowClient(tracking_uri, registry_uri=tracking_uri)


def run_pipeline(args: argparse.Namespace, server) -> None:
    """Run the flow (on `server`, the temporary Prefect server spawned at the start, if Prefect needs one) and
    print its summary."""
    from flows.sft_pipeline import sft_pipeline
    from flows.temporary_server import serving
    from tasks.core.config import load_config
    from tasks.reporting.report import human_stopped, human_summary

    cfg = load_config(args.config, args.overrides)  # fail fast, before any model starts
    try:
        with serving(server, meanwhile=lambda: open_mlflow(cfg.tracking_uri())):
            summary = sft_pipeline(args.config, args.overrides, args.run_id, force=args.force,
                                   refresh=args.refresh, refresh_from=args.refresh_from, until=args.until)
    except SftflowError:
        raise
    except Exception as e:  # not the user's: the failure hook said which step, why, and how to rerun it
        from tasks.reporting.failure import failure_line

        if (line := failure_line()) is None:
            raise
        raise StepFailed(line) from e
    print(f"summary: {cfg.runs_dir / summary['run_id'] / 'summary.json'}")
    if summary.get("skipped"):  # the data gate ended the run: nothing new to train on
        print(f"{summary['skipped']}: {summary['reason']}")
    elif summary.get("stopped_after"):  # --until: its last line says where the outputs are and how to go on
        print(human_stopped(summary))
    else:
        print(human_summary(summary))  # its last line: what the promotion gate decided and why


def prefect_api_problem(e: BaseException) -> str | None:
    """Return a one-line explanation if `e` is Prefect failing to start or reach its API server, else None."""
    import os

    text = str(e)
    if "ephemeral Prefect API server" in text:
        timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
        return (f"Prefect's temporary API server did not start within {timeout} s "
                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); the machine may be busy. Retry, raise that "
                "setting, or start a server with `make ui-prefect` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    if text.startswith("Failed to reach API at"):
        return (f"{text.rstrip('.')} (PREFECT_API_URL): start that server (e.g. `make ui-prefect`), or unset "
                "PREFECT_API_URL to let sftflow start a temporary one")
    return None


def dispatch(args: argparse.Namespace, server=None) -> None:
    """Run the chosen command; `server` is the temporary Prefect server spawned for `run` and `task`, or None."""
    if args.command == "env":
        print(shell_exports())
    elif args.command == "serve":
        from tasks.serving.serve import serve_command

        serve_command(args)  # blocks; Ctrl-C stops it cleanly
    elif args.command == "run":
        run_pipeline(args, server)
    elif args.command in ("promote", "rollback", "models"):
        print(registry_command(args))
    elif args.command == "diagnose":
        from tasks.train.diagnose import diagnose_run

        print(diagnose_run(args.runs_dir, args.run_id))
    else:
        from flows.single_task import run_step
        from flows.temporary_server import serving

        with serving(server):
            print(run_step(args.step, args.runs_dir, args.run_id, args.overrides))
        if args.inspect:
            from flows.single_task import inspect_format

            print(inspect_format(args.runs_dir, args.run_id, args.inspect, args.overrides, sys.stdout.isatty()))


def failed(message: str, code: int, error: BaseException) -> int:
    """Print the error line, free what the failed step's frames held, and return the exit code."""
    print(f"sftflow: error: {message}", file=sys.stderr)
    release(error)
    return code


def release(error: BaseException | None) -> None:
    """Clear the local variables of every frame in the tracebacks of `error` and of the errors it chains: a failed
    step's DuckDB connection lives on in them (Prefect keeps the failed state's exception) to the interpreter's end,
    where nanobind, DuckDB's bindings, reports it and its kind as dozens of `nanobind: leaked ...` lines."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def run_command(argv: list[str] | None) -> int:
    """Run the command line `argv` (None: sys.argv); return the exit code, an error printed as one line."""
    args = parse_args(argv)
    apply_defaults()  # before Prefect is imported: it reads its settings from the environment
    try:
        if (until := getattr(args, "until", None)) not in (None, *STEPS):  # one line, not argparse's usage text
            raise ConfigError(f"--until {until}: not a step; use one of {', '.join(STEPS)}")
        quiet_user_errors(every_traceback=args.command in ("run", "task"))  # both keep it in failure-traceback.txt
        server = None
        if args.command in ("run", "task"):  # they run Prefect tasks: its server boots while they import
            from flows.temporary_server import spawn_early

            server = spawn_early()
        dispatch(args, server)
    except StepFailed as e:
        return failed(str(e), 1, e)
    except SftflowError as e:
        return failed(str(e), 2, e)
    except RuntimeError as e:
        if (problem := prefect_api_problem(e)) is None:
            raise
        return failed(problem, 2, e)
    except ConnectionError as e:  # a network failure that outlived its task's retries (e.g. the Hub's 5xx)
        return failed(f"{e} (still failing after the step's retries; try again later)", 1, e)
    except KeyboardInterrupt as e:
        release(e)
        return 130
    return 0


def end_process(code: int) -> NoReturn:
    """End the process with `code` after its error line: run the exit handlers (Prefect sends its last logs, the
    temporary server stops), flush the output, and skip the interpreter's teardown, where nanobind would list any
    DuckDB object still referenced (see `release`) after the error line."""
    import atexit
    import os

    atexit._run_exitfuncs()  # noqa: SLF001 -- what a normal exit runs first
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sftflow` console script; returns the exit code. As the program itself (no `argv`), it
    ends the process on an error once the error line is out (`end_process`), a bug's traceback included."""
    if argv is not None:
        return run_command(argv)
    try:
        code = run_command(None)
    except Exception as e:  # noqa: BLE001 -- a bug outside any step: Python's report of it, then a clean exit
        traceback.print_exc()
        release(e)
        code = 1
    if code:
        end_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
