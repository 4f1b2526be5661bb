"""Training across machines: `train.num_machines: 2` as two launches on loopback, one process each (machine 0 the train
step, machine 1 `python -m tasks.train.join`), against today's `num_processes: 2` on one machine; FSDP and DeepSpeed
ZeRO stay GPU-only, refused on a CPU in one line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tasks.core.config import load_config
from tasks.train.train import train_model
from tests.conftest import assert_same_value, formatted_run, free_port

pytestmark = [pytest.mark.scale_out, pytest.mark.slow]  # slow: two accelerate launches as two machines

# 3 fp32 steps of 2 packed rows, one checkpoint at the end (each rank writes its RNG state into it)
JOB = ["train.num_processes=2", "train.max_steps=3", "train.save_steps=3", "train.compute_dtype=fp32"]
MACHINE_1_UMASK = 0o077  # machine 1's files come out 0600, machine 0's 0644: who wrote what can be read off them


def written_by_machine_1(path) -> bool:
    """Return True when `path` carries machine 1's umask (no group or other bits)."""
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def adapter_weights(train_dir):
    from safetensors.torch import load_file

    return load_file(train_dir / "adapter" / "adapter_model.safetensors")


def test_two_machines_of_one_process_train_the_adapter_two_processes_on_one_machine_train(tiny_model_dir, tmp_path):
    import torch

    cfg, run = formatted_run(tmp_path / "runs", tiny_model_dir)
    one = load_config(run.config, JOB).train
    train_model(run.formatted, str(tiny_model_dir), tmp_path / "one-machine", one, cores=2)

    port = free_port()
    two = load_config(run.config, [*JOB, "train.num_machines=2", "train.main_process_ip=127.0.0.1",
                                   f"train.main_process_port={port}"]).train
    shared = tmp_path / "runs" / "two-machines" / "train"  # the shared runs_dir both machines mount
    joiner = subprocess.Popen(  # machine 1: started first, it waits for the job machine 0 writes
        [sys.executable, "-c", f"import os, sys; os.umask({MACHINE_1_UMASK}); from tasks.train.join import main; "
                               f"sys.exit(main({[str(shared), '--machine-rank', '1', '--wait', '300']!r}))"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    before = os.umask(0o022)
    try:
        saved = train_model(run.formatted, str(tiny_model_dir), shared, two, cores=1)  # machine 0, in this process
        output, _ = joiner.communicate(timeout=300)
    finally:
        os.umask(before)
        joiner.kill()
    assert joiner.returncode == 0, output[-3000:]
    assert f"join: machine 1 done; machine 0's rank 0 saves the result to {shared / 'adapter'}" in output

    # the same job as one machine with two processes: rank 0 and rank 1 saw the same batches, so the same adapter
    reference, spread = adapter_weights(tmp_path / "one-machine"), adapter_weights(shared)
    assert saved == shared / "adapter" and reference.keys() == spread.keys()
    for name in reference:
        assert_same_value(spread[name], reference[name], torch.float32)
    ranks = {r: json.loads((shared / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(rec["world_size"] == 2 and rec["backend"] == "gloo" and rec["global_step"] == 3
               for rec in ranks.values()), ranks
    launch = json.loads((shared / "distributed_job-machine1.json").read_text())
    assert launch["cfg"]["machine_rank"] == 0 and launch["out_dir"] == str(shared)  # machine 0's job, as read

    # rank 0 alone writes the outputs; machine 1 wrote only its rank record, its launch files and its RNG state.
    # Not told apart by mode: safetensors files (always created 0600) and packing.json (the same report, written by
    # every rank that builds the trainer)
    files = [p for p in shared.rglob("*") if p.is_file() and p.suffix != ".safetensors" and p.name != "packing.json"]
    outputs = [p for p in files if p.parent.name == "adapter" or p.name == "log_history.json"]
    assert len(outputs) >= 4 and not any(written_by_machine_1(p) for p in outputs)
    by_machine_1 = sorted(str(p.relative_to(shared)) for p in files if written_by_machine_1(p))
    assert by_machine_1 == ["accelerate_config-machine1.yaml", "checkpoints/checkpoint-3/rng_state_1.pth",
                            "distributed_job-machine1.json", "ranks/rank1.json"]
