"""Every test here runs against a real Prefect API: the session's test harness (tests/conftest.py `prefect_backend`)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def flows_prefect_backend(prefect_backend):
    yield
