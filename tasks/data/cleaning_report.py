"""The cleaning report as the Prefect markdown artifact `cleaning-report`: the accounting, source warnings, rows
dropped per rule and a few quarantined rows of each."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.artifacts import cell, markdown_table, publish_markdown


def cleaning_markdown(report: dict) -> str:
    """Return the cleaning report as markdown: the accounting, each source warning, the rows dropped per rule, then
    a few quarantined rows of each rule (where, why, the row cut short)."""
    head = (f"# Cleaning: {report['rows_raw']} raw rows -> {report['rows_clean']} clean + "
            f"{report['rows_quarantined']} quarantined")
    lines = [head, ""]
    lines += [f"**Warning:** {w['message']}\n" for w in report.get("source_warnings", [])]
    lines += markdown_table(["rule", "rows", "example", "detail"], [
        [r["rule"], r["rows"], Path(str(r["example"])).name, r["example_detail"]] for r in report["rules"]]
        or [["-", 0, "", ""]])
    edits = ", ".join(f"{k} {v}" for k, v in report.get("edited_by_rule", {}).items())
    split = ", ".join(f"{k} {v}" for k, v in report.get("split", {}).items())
    lines += ["", f"Kept but edited: {edits or 'none'}. Split of the clean rows: {split or '-'}."]
    for rule, examples in report.get("examples", {}).items():
        total = report.get("dropped_by_rule", {}).get(rule, len(examples))
        lines += ["", f"## {rule}: {total} row{'s' if total != 1 else ''} (first {len(examples)})", ""]
        lines += [f"- **{cell(e['where'])}** ({cell(e['detail'])}): {cell(e['preview'], 400)}" for e in examples]
    if report.get("quarantine_file"):
        lines += ["", (f"Every quarantined row, with its rule and raw record: `{report['quarantine_file']}` "
                       "(and table `quarantine` of the clean DuckDB file).")]
    return "\n".join(lines) + "\n"


def publish_cleaning_report(clean_report: Path) -> None:
    """Show the cleaning report as the Prefect markdown artifact `cleaning-report`."""
    report = json.loads(clean_report.read_text(encoding="utf-8"))
    rules = ", ".join(f"{r['rule']} {r['rows']}" for r in report["rules"]) or "no rule dropped a row"
    publish_markdown("cleaning-report", cleaning_markdown(report),
                     f"Cleaning: {report['rows_raw']} raw rows -> {report['rows_clean']} clean + "
                     f"{report['rows_quarantined']} quarantined ({rules}); examples of each rule inside")
