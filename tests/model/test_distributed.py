"""train.num_processes > 1: training through `accelerate launch`, 2 CPU processes with gloo, on the tiny model."""

import json
import logging
import math

import pytest
import yaml

from tasks.core.config import RunPaths, load_config
from tasks.core.errors import ConfigError
from tasks.data.clean import clean
from tasks.data.ingest import fingerprint_sources, ingest
from tasks.evaluate.evaluate import evaluate_adapter
from tasks.formatting.chat_format import format_chats
from tasks.train.distributed import check_distributed_config, launch_env, prepare_launch, threads_per_process
from tasks.train.train import train_model
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # accelerate launch with worker processes


@pytest.fixture(scope="module")
def formatted(tiny_model_dir, tmp_path_factory):
    """configs/tiny.yaml's data, ingested, cleaned and formatted for the tiny model: (run paths, formatted dir)."""
    tmp = tmp_path_factory.mktemp("distributed")
    cfg = tiny_config(tmp, tiny_model_dir)
    run = RunPaths(tmp, "dist")
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    return run, format_chats.fn(clean_db, str(tiny_model_dir), run.formatted, cfg.chat)


def tiny_config(runs_dir, tiny_model_dir, *overrides):
    """Return configs/tiny.yaml on the tiny model, with overrides."""
    return load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={runs_dir}", f"train.base_model={tiny_model_dir}",
                                                       "evaluate.max_samples=4", *overrides])


def test_two_cpu_processes_train_one_qlora_adapter_that_evaluate_uses(formatted, tiny_model_dir, caplog):
    import pyarrow.parquet as pq

    caplog.set_level(logging.INFO, logger="sftflow")
    run, chats = formatted
    cfg = tiny_config(run.runs_dir, tiny_model_dir, "train.num_processes=2", "train.max_steps=3", "train.packing=false",
                      "train.save_steps=100")
    assert cfg.train.method == "qlora"
    adapter = train_model(chats, str(tiny_model_dir), run.train, cfg.train)

    assert adapter == run.train / "adapter" and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file() and not (run.train / "adapter.tmp").exists()
    ranks = [json.loads((run.train / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    rows = pq.read_metadata(chats / "train.parquet").num_rows
    half = math.ceil(rows / (cfg.train.batch_size * 2))  # each rank gets every other batch of the epoch
    for rank, record in enumerate(ranks):
        assert record == {"rank": rank, "world_size": 2, "backend": "gloo", "distributed_type": "MULTI_CPU",
                          "global_step": 3, "batches_per_epoch": half}
    history = json.loads((run.train / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    messages = [r.getMessage() for r in caplog.records if r.name == "sftflow"]
    assert any(m.startswith("[rank 0] train step 3/3  loss ") for m in messages), messages
    assert not any(m.startswith("[rank 1] train step") for m in messages), messages  # one progress line per step

    evaluation = evaluate_adapter.fn(chats, str(tiny_model_dir), adapter, run.eval, cfg.evaluate, cfg.train)
    report = json.loads((evaluation / "report.json").read_text())
    assert report["eval_loss"] > 0 and 0 <= report["tuned_exact_match"] <= 1


def test_a_failing_worker_fails_the_task_with_one_line_naming_the_rank_and_cause(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """...and the launcher's per-rank files stay in the train dir: torch's elastic agent, given no log dir, makes one
    in the temp dir per launch and never removes it."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # the launcher's and its ranks' temp dir
    cfg = tiny_config(tmp_path, tiny_model_dir, "train.num_processes=2", "train.max_steps=1")
    missing = tmp_path / "formatted"  # no train.parquet: every worker fails reading its rows
    missing.mkdir()
    with pytest.raises(RuntimeError) as failed:
        train_model(missing, str(tiny_model_dir), tmp_path / "train", cfg.train)
    message = str(failed.value)
    assert "\n" not in message and "accelerate launch exited 1" in message, message
    assert "rank " in message and "train.parquet" in message, message
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p.name for p in (tmp_path / "train" / "launcher" / "machine0").iterdir()]  # torch's attempt folder


def test_fsdp_launch_config_shards_transformer_blocks_and_cpu_or_qlora_fsdp_is_refused(tmp_path, tiny_model_dir):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.method=lora", "train.num_processes=2",
                                                       "train.distributed=fsdp"]).train
    cmd, env = prepare_launch(tmp_path / "fmt", str(tiny_model_dir), tmp_path / "train", cfg, cuda=True)
    config_file, spec_file = tmp_path / "train" / "accelerate_config.yaml", tmp_path / "train" / "distributed_job.json"
    written = yaml.safe_load(config_file.read_text())
    assert written["distributed_type"] == "FSDP" and written["num_processes"] == 2 and written["use_cpu"] is False
    assert written["fsdp_config"]["fsdp_version"] == 2
    assert written["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert written["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # rank 0 saves a whole adapter
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(config_file),
                       "--log_dir", str(tmp_path / "train" / "launcher" / "machine0"), "-m",
                       "tasks.train.distributed", str(spec_file)]
    assert "ACCELERATE_USE_CPU" not in env or env["ACCELERATE_USE_CPU"] != "true"
    spec = json.loads(spec_file.read_text())
    assert spec["cfg"]["distributed"] == "fsdp"

    with pytest.raises(ConfigError, match="train.distributed=fsdp needs CUDA devices"):
        check_distributed_config(cfg, cuda=False)  # accelerate would silently run DDP on CPU processes
    with pytest.raises(ConfigError, match="cannot shard the bitsandbytes-quantized base of method qlora"):
        check_distributed_config(cfg.model_copy(update={"method": "qlora"}), cuda=True)


def test_two_jobs_get_different_free_ports_and_share_the_cores(tmp_path, tiny_model_dir):
    from accelerate.utils import is_port_in_use

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.num_processes=2"]).train
    ports = []
    for job in ("a", "b"):
        prepare_launch(tmp_path / "fmt", str(tiny_model_dir), tmp_path / job, cfg, cuda=False)
        ports.append(yaml.safe_load((tmp_path / job / "accelerate_config.yaml").read_text())["main_process_port"])
    assert ports[0] != ports[1] and not any(is_port_in_use(p) for p in ports)
    assert threads_per_process(2, cores=2) == 1 and threads_per_process(4, cores=2) == 1
    assert threads_per_process(2, cores=16) == 8
    assert launch_env(2, cuda=False)["OMP_NUM_THREADS"] == str(threads_per_process(2))
