"""The fast tier (`make test-fast`: `-m "not slow"`) still tests every module of tasks/ and flows/: each is imported by
a test file (or conftest.py) not marked slow as a whole, or by a module such a file imports (one step: the module
under test and the parts it is built from). Marking a module's only tests slow fails here, naming the module."""

from __future__ import annotations

from tests.conftest import ROOT, slow_as_a_whole
from tests.unit.test_layers import imports, modules


def test_every_module_has_tests_in_the_fast_tier():
    found = {name: path for name, path in modules().items() if path.name != "__init__.py"}
    fast = [p for p in (ROOT / "tests").rglob("*.py") if not slow_as_a_whole(p)]  # conftest fixtures count
    assert len(fast) > 20 and any(slow_as_a_whole(p) for p in (ROOT / "tests").rglob("test_*.py"))
    tested = {m for p in fast for m in imports(p) if m in found}
    reached = tested | {m for t in tested for m in imports(found[t]) if m in found}
    assert sorted(set(found) - reached) == []


def test_the_longest_files_list_names_test_files_that_exist():
    """conftest.py starts these first on the xdist workers: a renamed or deleted file would silently start last."""
    from tests.conftest import LONGEST_FILES

    assert len(set(LONGEST_FILES)) == len(LONGEST_FILES)
    assert [name for name in LONGEST_FILES if not (ROOT / "tests" / name).is_file()] == []
