"""The house's layout holds: tasks/ is one subpackage per stage or concern, each imports only from its own group and
the groups below it (a function-level import counts too), no module imports in a circle, tasks never imports flows,
and the packages' __init__ files stay empty so imports stay lazy and the CLI starts fast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

# lowest first: a group may import its own modules and those of the groups before it
LAYERS = ("core", "model", "data", "formatting", "train", "registry", "evaluate", "serving", "reporting")


def modules() -> dict[str, Path]:
    """Return every module of tasks/ and flows/ by dotted name."""
    found = {}
    for package in ("tasks", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """Return the tasks/flows modules a file imports, at any depth (an import inside a function counts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("tasks", "flows"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from tasks.data import ingest`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in ("tasks", "flows"))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_every_module_of_tasks_sits_in_a_known_group_and_nothing_flat_is_left():
    flat = [name for name, path in modules().items()
            if name.startswith("tasks.") and name.count(".") == 1 and path.name != "__init__.py"]
    assert flat == [] and {name.split(".")[1] for name in modules() if name.startswith("tasks.")} == set(LAYERS)


def test_groups_import_downward_only():
    upward = [f"{a} -> {b}" for a, deps in graph().items() if a.startswith("tasks.")
              for b in deps if b.startswith("tasks.") and layer(b) > layer(a)]
    assert upward == []


def test_tasks_never_imports_flows():
    assert [f"{a} -> {b}" for a, deps in graph().items() if a.startswith("tasks.") for b in deps
            if b.startswith("flows")] == []


def test_no_module_imports_in_a_circle():
    deps, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(deps[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for name in sorted(deps):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("package", sorted({p.parent for p in (ROOT / "tasks").rglob("__init__.py")}))
def test_package_init_files_stay_empty(package):
    assert (package / "__init__.py").read_text(encoding="utf-8") == ""


def test_the_check_sees_an_upward_import(tmp_path):
    # the rule is not vacuous: a data module importing the train group is caught
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tasks.train.trainer import build_trainer\n")
    assert "tasks.train.trainer" in imports(bad) and layer("tasks.train.trainer") > layer("tasks.data.clean")


def test_a_training_rank_and_the_model_server_import_no_prefect():
    """Only the Prefect side of a stage (tasks/core/stage.py, and the modules that define tasks) imports Prefect: a
    training rank (`python -m tasks.train.distributed`) and `sftflow serve` run no Prefect task, and each of their
    processes would spend ~1.5 CPU-s importing it. Their logger is the standard one there."""
    import subprocess
    import sys

    probe = ("import sys\nimport flows.cli, tasks.train.distributed, tasks.train.trainer, tasks.train.checkpoints\n"
             "import tasks.model.tokenizer, tasks.serving.serve\nfrom tasks.core.common import stage_logger\n"
             "assert stage_logger().name == 'sftflow'\nprint(sorted(m for m in sys.modules if m.split('.')[0] == "
             "'prefect'))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]


def test_each_process_sftflow_starts_collects_garbage_less_often_before_its_imports():
    """The CLI and a worker's flow run import the flows package first, and a training rank calls its `main`: each sets
    GC_THRESHOLDS before its heavy imports (a fifth of their CPU goes to collections at CPython's default)."""
    import subprocess
    import sys

    from tasks.core.common import GC_THRESHOLDS

    probe = ("import gc\nimport flows\nprint(gc.get_threshold())\n"
             "import tasks.train.distributed as rank\ngc.set_threshold(700, 10, 10)\n"
             "try:\n    rank.main(['/nonexistent/distributed_job.json'])\nexcept FileNotFoundError:\n"
             "    print(gc.get_threshold())\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == [str(GC_THRESHOLDS)] * 2
    assert GC_THRESHOLDS[0] > 700  # CPython's default
