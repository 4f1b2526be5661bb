"""Validate: run the Great Expectations suites from `expectations/` on raw, clean and tokenized rows.

Each suite runs through a GX checkpoint in a file context inside the run directory, so every run gets its own
Data Docs site. A failed suite stops the flow with a one-line summary naming each failed expectation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd

from tasks.core.artifacts import markdown_table, publish_markdown
from tasks.core.common import stage_logger
from tasks.core.config import RunPaths, ValidateConfig
from tasks.core.errors import DataValidationError
from tasks.core.stage import stage_task
from tasks.data.gx_messages import explain_failure

# One row per record / conversation / tokenized row, with the derived columns each suite checks.
PROFILES = {
    "raw": """SELECT * EXCLUDE (messages, record), len(messages) AS n_turns FROM db.raw ORDER BY row_id""",
    "clean": """SELECT content_hash, split, len(messages) AS n_turns, n_chars,
                       list_min(list_transform(messages,  -- a turn that calls tools may have no text
                           lambda t: length(t.content) + coalesce(length(t.tool_calls), 0))) AS min_turn_chars,
                       messages[-1].role AS last_role,
                       array_to_string(list_transform(messages, lambda t: t.role), ',') AS roles
                FROM db.clean ORDER BY row_id""",
    "tokenized": """SELECT row_id, n_tokens, n_supervised, truncated,
                           n_supervised / greatest(n_tokens, 1) AS supervised_share,
                           truncated OR last_eot_supervised AS eot_supervised_or_truncated
                    FROM read_parquet($path)""",
}


def load_profile(stage: str, data: Path) -> pd.DataFrame:
    """Return the rows a stage's suite checks: raw/clean from a DuckDB file, tokenized from formatted Parquet."""
    with duckdb.connect() as con:
        if stage == "tokenized":
            return con.execute(PROFILES[stage], {"path": str(data / "train.parquet")}).df()
        con.execute("ATTACH ? AS db (READ_ONLY)", [str(data)])
        return con.execute(PROFILES[stage]).df()


def load_suite(path: Path, extra: list[dict]):
    """Return the GX suite stored as JSON at `path`, plus the config-driven expectations in `extra`."""
    import great_expectations as gx

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError(f"{path}: expectation suite not found (see the validate section)") from None
    spec["expectations"] = [*spec.get("expectations", []), *extra]
    return gx.ExpectationSuite(**spec)


def config_expectations(stage: str, cfg: ValidateConfig) -> list[dict]:
    """Return the expectations whose bounds live in the config rather than in the suite file."""
    if stage == "clean":
        return [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": cfg.min_rows}}]
    if stage == "tokenized":
        return [{"type": "expect_column_mean_to_be_between",
                 "kwargs": {"column": "truncated", "max_value": cfg.max_truncation_rate}}]
    return []


def checkpoint_for(context, suite, docs: bool = True):
    """Return a checkpoint that validates a dataframe against `suite` and, with `docs`, updates the Data Docs
    (idempotent)."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    suite = context.suites.add_or_update(suite)
    source = context.data_sources.add_or_update_pandas("sftflow")
    try:
        asset = source.get_asset(suite.name)
    except LookupError:
        asset = source.add_dataframe_asset(suite.name)
    try:
        batch = asset.get_batch_definition("all")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
    return context.checkpoints.add_or_update(gx.Checkpoint(
        name=suite.name, validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="data_docs")] if docs else []))


def run_suite(frame: pd.DataFrame, suite, docs_root: Path | None = None) -> tuple[list[dict], str | None]:
    """Validate `frame`; return one dict per expectation and the Data Docs URL (file context in `docs_root`).

    Without `docs_root` the context is ephemeral and builds no Data Docs: GX would write them to a temporary folder
    that nothing returns or removes."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    context = gx.get_context(mode="file", project_root_dir=str(docs_root)) if docs_root else gx.get_context(
        mode="ephemeral")
    # GX draws a "Calculating Metrics" bar per suite on stderr: noise in a pipeline's log (the results are reported)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    result = checkpoint_for(context, suite, docs=docs_root is not None).run(batch_parameters={"dataframe": frame})
    (validation,) = result.run_results.values()
    rows = [{"expectation": r.expectation_config.type,
             "kwargs": {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
             "success": bool(r.success), "unexpected_count": r.result.get("unexpected_count"),
             "element_count": r.result.get("element_count"),
             "observed_value": r.result.get("observed_value"),
             "examples": r.result.get("partial_unexpected_list", [])[:3]} for r in validation.results]
    urls = context.get_docs_sites_urls() if docs_root else []
    return rows, (urls[0].get("site_url") if urls else None)


def summarise_failures(results: list[dict], stage: str = "", data: Path | None = None) -> str:
    """Return one readable clause per failed expectation: expected, observed, likely cause
    (tasks/data/gx_messages.py)."""
    return "; ".join(explain_failure(stage, r, data) for r in results if not r["success"])


def validate_table(stage: str, data: Path, suite_file: Path, cfg: ValidateConfig,
                   docs_root: Path | None = None) -> tuple[list[dict], str | None]:
    """Run a stage's suite on its data; return the results and the Data Docs URL."""
    return run_suite(load_profile(stage, data), load_suite(suite_file, config_expectations(stage, cfg)), docs_root)


def results_markdown(stage: str, results: list[dict], docs_url: str | None, failures: str = "") -> str:
    """Return a suite's results as markdown: passed count, one row per expectation, the failures explained, and a
    link to the run's Data Docs."""
    passed = sum(r["success"] for r in results)
    lines = [f"# Great Expectations on {stage} rows: {passed} of {len(results)} expectations passed", ""]
    if failures:
        lines += [f"**Failed, so the run stopped before training:** {failures}", ""]
    # result first and long values last, cut short: Prefect's tables do not wrap, a wide cell hides the columns after it
    lines += markdown_table(["result", "expectation", "column", "unexpected", "observed", "bounds"], [
        ["passed" if r["success"] else "**FAILED**", r["expectation"].removeprefix("expect_"),
         r["kwargs"].get("column", ""), "" if r["unexpected_count"] is None else r["unexpected_count"],
         "" if r["observed_value"] is None else r["observed_value"],
         {k: v for k, v in r["kwargs"].items() if k != "column"} or ""] for r in results], limit=48)
    if docs_url:
        lines += ["", f"[Data Docs of this run]({docs_url}) (every suite, with the failing values): `{docs_url}`"]
    return "\n".join(lines) + "\n"


def publish_results(stage: str, results: list[dict], docs_url: str | None, failures: str = "") -> None:
    """Show the suite's results as the Prefect markdown artifact `gx-<stage>-rows`, linked to the run's Data Docs."""
    passed = sum(r["success"] for r in results)
    verdict = "passed" if not failures else f"FAILED ({len(results) - passed} failed)"
    publish_markdown(f"gx-{stage}-rows", results_markdown(stage, results, docs_url, failures),
                     f"Great Expectations on {stage} rows: {passed} of {len(results)} expectations {verdict}; "
                     "Data Docs linked inside")


@stage_task("validate")
def validate(stage: str, data: Path, suite_file: Path, out_report: Path, out_docs: Path, cfg: ValidateConfig) -> Path:
    """Run the `stage` suite (raw, clean or tokenized) on `data`; write the results; raise on a failed suite."""
    stage_logger().info("validate %s: running suite %s on %s", stage, suite_file, data)
    results, docs_url = validate_table(stage, data, suite_file, cfg, out_docs)
    out_report.parent.mkdir(parents=True, exist_ok=True)
    out_report.write_text(json.dumps({"data_docs": docs_url, "results": results}, indent=1, default=str),
                          encoding="utf-8")
    failures = summarise_failures(results, stage, data)
    publish_results(stage, results, docs_url, failures)
    if failures:
        raise DataValidationError(f"{data}: suite {suite_file} failed: {failures} (details: {out_report})")
    stage_logger().info("validate %s: %d expectations passed on %s; Data Docs %s", stage, len(results), data,
                          docs_url)
    return out_report


def validation_args(stage: str, data: Path, run: RunPaths, cfg: ValidateConfig) -> tuple:
    """Return the `validate` task's arguments for one stage of a run: suite, report path and Data Docs root."""
    return stage, data, cfg.suite_for(stage), run.validation / f"{stage}.json", run.root, cfg
