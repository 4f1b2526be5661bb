"""A real Prefect API (the test harness: a temporary SQLite server) with result storage in a temp dir."""

import pytest
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session", autouse=True)
def prefect_backend(tmp_path_factory):
    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}), prefect_test_harness(server_startup_timeout=120):
        yield
