"""One redaction for every writer: user info and token query values in any URI become ***, links drop them, the
URI sftflow connects with is revealed from the environment only, and log records are redacted before any handler."""

import json
import logging

import pytest

from tasks.core.redact import RedactingFilter, has_secret, public_url, redact, redact_value, remember, reveal

SECRET = "http://user:TOKEN@127.0.0.1:5000"


@pytest.mark.parametrize(("text", "expected"), [
    (SECRET, "http://***@127.0.0.1:5000"),
    (f"see {SECRET}/#/experiments/1 now", "see http://***@127.0.0.1:5000/#/experiments/1 now"),
    ("https://TOKEN@host/api", "https://***@host/api"),
    ("http://h/x?token=TOKEN&b=2", "http://h/x?token=***&b=2"),
    ("http://h/x?a=1&Access_Token=TOKEN", "http://h/x?a=1&Access_Token=***"),
    ("s3://b/k?X-Amz-Signature=TOKEN&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
    ("sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/runs/mlflow.db"),
    ("http://127.0.0.1:5000/#/models/m/versions/1", "http://127.0.0.1:5000/#/models/m/versions/1"),
    ("lr=0.1, batch=8", "lr=0.1, batch=8"),
])
def test_redact_masks_user_info_and_secret_query_values_and_leaves_the_rest(text, expected):
    assert redact(text) == expected and "TOKEN" not in redact(text)
    assert has_secret(text) == (text != expected)


def test_links_drop_credentials_altogether():
    assert public_url(SECRET + "/") == "http://127.0.0.1:5000/"
    assert public_url("http://h:1/p?token=TOKEN&x=1") == "http://h:1/p?x=1"


def test_redact_value_walks_summaries_and_keys():
    summary = {"mlflow_run_url": f"{SECRET}/#/r", "nested": [{"u": SECRET}], "n": 3, SECRET: True}
    assert "TOKEN" not in json.dumps(redact_value(summary)) and redact_value(summary)["n"] == 3


def test_a_redacted_uri_is_revealed_from_the_environment_or_this_process_only(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert reveal("http://***@other:1") is None  # the secret is not to be had here
    assert reveal("sqlite:///x.db") == "sqlite:///x.db"  # nothing redacted: as it is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET)
    assert reveal(redact(SECRET)) == SECRET
    remember("http://a:B@elsewhere:2")
    assert reveal("http://***@elsewhere:2") == "http://a:B@elsewhere:2"


def test_a_log_record_is_redacted_before_any_handler_sees_it(caplog):
    logger = logging.getLogger("sftflow.test-redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="sftflow.test-redact"):
        logger.info("run at %s/#/experiments/%d", SECRET, 1)
    assert caplog.records[-1].getMessage() == "run at http://***@127.0.0.1:5000/#/experiments/1"


def test_the_mlflow_ui_link_never_carries_credentials():
    from tasks.core.links import mlflow_file_url, run_url, version_url

    for url in (run_url(SECRET, "1", "abc"), version_url(SECRET + "?token=TOKEN", "m", "2"),
                mlflow_file_url(SECRET, "abc", "train/x.png")):
        assert "TOKEN" not in url and url.startswith("http://127.0.0.1:5000/")


def test_the_saved_config_of_a_run_is_redacted_and_reveals_its_uri_from_the_environment(tmp_path, monkeypatch):
    from tasks.core.config import dump_config, load_config
    from tasks.core.errors import ConfigError
    from tasks.reporting.report import save_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path}", f"register.tracking_uri={SECRET}"])
    saved = save_config.fn(dump_config(cfg), tmp_path / "config.yaml")
    assert "TOKEN" not in saved.read_text() and "http://***@127.0.0.1:5000" in saved.read_text()
    rerun = load_config(saved, [])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET)
    assert rerun.tracking_uri() == SECRET  # connects with the real URI
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    import tasks.core.redact as redact_module

    monkeypatch.setattr(redact_module, "REMEMBERED", {})
    with pytest.raises(ConfigError, match="its credentials were redacted when the run's config was saved; set "
                                          "MLFLOW_TRACKING_URI"):
        rerun.tracking_uri()


def test_an_mlflow_error_quoting_a_uri_with_credentials_is_raised_again_redacted_as_an_mlflow_error():
    from mlflow.exceptions import MlflowException

    from tasks.core.redact import redacted_errors

    with pytest.raises(MlflowException) as raised, redacted_errors():
        raise MlflowException(f"API request to {SECRET}/api/2.0/mlflow/runs/get failed", error_code="INTERNAL_ERROR")
    assert "TOKEN" not in str(raised.value) and raised.value.error_code == "INTERNAL_ERROR"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(ValueError, match="plain"), redacted_errors():
        raise ValueError("plain")
