"""sftflow stages: each module is one pipeline step; Prefect tasks wrap plain, testable helpers."""
