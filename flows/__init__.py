"""sftflow flows: orchestration only (load config, call tasks, gates)."""
