"""Validate: run the Great Expectations suite from `expectations/` on the clean table; a failed suite stops the flow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd
from prefect import get_run_logger

from tasks.common import stage_task
from tasks.config import ValidateConfig
from tasks.errors import DataValidationError

# One row per clean conversation, with the derived columns the suite checks.
PROFILE_SQL = """
SELECT content_hash, split, len(messages) AS n_turns, n_chars,
       list_min(list_transform(messages, lambda t: length(t.content))) AS min_turn_chars,
       messages[-1].role AS last_role,
       array_to_string(list_transform(messages, lambda t: t.role), ',') AS roles
FROM clean ORDER BY row_id
"""


def load_suite(path: Path, min_rows: int):
    """Return the GX suite stored as JSON at `path`, plus the configured minimum row count."""
    import great_expectations as gx

    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError(f"{path}: expectation suite not found (validate.suite)") from None
    spec["expectations"] = [*spec.get("expectations", []),
                             {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": min_rows}}]
    return gx.ExpectationSuite(**spec)


def run_suite(frame: pd.DataFrame, suite) -> list[dict]:
    """Validate `frame` against `suite` in an ephemeral GX context; return one dict per expectation."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    suite = context.suites.add(suite)
    batch = context.data_sources.add_pandas("sftflow").add_dataframe_asset("rows").add_batch_definition_whole_dataframe(
        "all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=suite.name, data=batch, suite=suite))
    result = definition.run(batch_parameters={"dataframe": frame})
    return [{"expectation": r.expectation_config.type, "kwargs": {k: v for k, v in r.expectation_config.kwargs.items()
                                                                 if k != "batch_id"},
             "success": bool(r.success), "unexpected_count": r.result.get("unexpected_count"),
             "observed_value": r.result.get("observed_value"),
             "examples": r.result.get("partial_unexpected_list", [])[:3]} for r in result.results]


def summarise_failures(results: list[dict]) -> str:
    """Return one readable clause per failed expectation."""
    parts = []
    for r in results:
        if r["success"]:
            continue
        column = r["kwargs"].get("column", "table")
        what = (f"{r['unexpected_count']} rows unexpected, e.g. {r['examples']}" if r["unexpected_count"] is not None
                else f"observed {r['observed_value']}")
        parts.append(f"{r['expectation']}({column}): {what}")
    return "; ".join(parts)


def validate_table(clean_db: Path, cfg: ValidateConfig) -> list[dict]:
    """Profile the clean table and return the suite's results, one dict per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    with duckdb.connect(str(clean_db), read_only=True) as con:
        frame = con.sql(PROFILE_SQL).df()
    return run_suite(frame, load_suite(cfg.suite, cfg.min_rows))


@stage_task("validate")
def validate(clean_db: Path, suite_file: Path, out_report: Path, cfg: ValidateConfig) -> Path:
    """Validate the clean table (raises DataValidationError on failure) and write the results to `out_report`."""
    results = validate_table(clean_db, cfg)
    out_report.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    if failures := summarise_failures(results):
        raise DataValidationError(f"{clean_db}: suite {cfg.suite} failed: {failures} (details: {out_report})")
    get_run_logger().info("validate: %d expectations passed on %s", len(results), clean_db)
    return out_report
