"""sftflow flows: orchestration only (load config, call tasks, gates).

Every process that runs a flow or a CLI verb imports this package first, so it sets the garbage collector's
thresholds here, before the heavy imports (tasks/core/common.py `collect_garbage_less_often`)."""

from tasks.core.common import collect_garbage_less_often

collect_garbage_less_often()
