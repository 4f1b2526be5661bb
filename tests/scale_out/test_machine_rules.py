"""Training across machines, its rules without a second machine: FSDP and DeepSpeed ZeRO stay GPU-only, refused on a
CPU in one line; a job across machines needs machine 0's address and a share of processes per machine; a joining
machine refuses a job that spans one machine, or none written in time. (The job itself: test_machines.py, slow.)"""

from __future__ import annotations

import json

import pytest

from tasks.core.config import load_config
from tasks.core.errors import ConfigError
from tasks.train.distributed import accelerate_config, check_distributed_config, launch_files
from tasks.train.join import join_training, main
from tests.conftest import ROOT

pytestmark = pytest.mark.scale_out


def test_fsdp_and_deepspeed_zero_are_gpu_choices_refused_on_a_cpu_in_one_line(tmp_path):
    tiny = ROOT / "configs" / "tiny.yaml"
    for kind in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        cfg = load_config(tiny, ["train.method=lora", "train.num_processes=2", f"train.distributed={kind}"]).train
        with pytest.raises(ConfigError) as refused:
            check_distributed_config(cfg, cuda=False)
        assert str(refused.value).startswith(f"train.distributed={kind} needs CUDA devices") and \
            "\n" not in str(refused.value) and str(refused.value).endswith("use train.distributed=ddp on a CPU")
    zero3_qlora = load_config(tiny, ["train.num_processes=2", "train.distributed=deepspeed_zero3"]).train
    with pytest.raises(ConfigError, match="deepspeed_zero3 cannot shard the bitsandbytes-quantized base of method"):
        check_distributed_config(zero3_qlora, cuda=True)
    # on GPUs, accelerate's own DeepSpeed keys: ZeRO stage, and the trainer's accumulation and clipping
    zero2 = load_config(tiny, ["train.num_processes=16", "train.num_machines=2", "train.machine_rank=1",
                               "train.main_process_ip=10.0.0.1", "train.main_process_port=29500",
                               "train.distributed=deepspeed_zero2"]).train
    written = accelerate_config(zero2, 29500, cuda=True)
    assert (written["distributed_type"], written["num_processes"], written["num_machines"], written["machine_rank"],
            written["main_process_ip"], written["use_cpu"]) == ("DEEPSPEED", 16, 2, 1, "10.0.0.1", False)
    zero = written["deepspeed_config"]
    assert (zero["zero_stage"], zero["gradient_accumulation_steps"]) == (2, zero2.gradient_accumulation_steps)


def test_a_job_across_machines_needs_an_address_a_port_and_a_share_of_processes_per_machine():
    tiny = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"train.num_machines=2 needs train.main_process_ip and "
                                          r"train.main_process_port: machine 0's address"):
        load_config(tiny, ["train.num_processes=2", "train.num_machines=2"])
    with pytest.raises(ConfigError, match=r"train.num_processes=3 counts every machine's processes: use a multiple"):
        load_config(tiny, ["train.num_processes=3", "train.num_machines=2", "train.main_process_ip=h",
                           "train.main_process_port=1"])


def test_a_joining_machine_refuses_a_job_on_one_machine_or_none_written_in_time(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"distributed_job.json: machine 0 wrote no job there within 0 s; start the "
                                          r"run's train step \(machine 0\)"):
        join_training(tmp_path, 1, wait_s=0)
    spec = launch_files(tmp_path, 0)[0]
    spec.write_text(json.dumps({"cfg": {"num_machines": 1}}))
    assert main([str(tmp_path), "--machine-rank", "1", "--wait", "0"]) == 2
    assert capsys.readouterr().err == (f"join: error: {spec}: the job trains on one machine (train.num_machines=1); "
                                       "nothing to join\n")
