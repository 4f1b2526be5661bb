"""Join a training job that spans machines: `python -m tasks.train.join TRAIN_DIR --machine-rank N` on every machine but
machine 0 (`train.num_machines` > 1).

Machine 0 runs the pipeline's train step: it owns the run's train dir and writes the job there (distributed_job.json,
tasks/train/distributed.py). A joining machine reads that job from the shared runs_dir, so it trains on the same rows,
base model path and settings, and starts its own `accelerate launch` with its machine rank; its processes meet machine
0's at train.main_process_ip:main_process_port. It writes no outputs: rank 0, on machine 0, saves them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tasks.core import errors
from tasks.core.config import TrainConfig
from tasks.core.errors import ConfigError
from tasks.train.distributed import launch_files, train_distributed


def join_training(out_dir: Path, machine_rank: int, wait_s: float = 600, cores: int | None = None) -> Path:
    """Join the job machine 0 writes into the shared train dir `out_dir` as machine `machine_rank`: wait (up to
    `wait_s`) for its job spec, then launch this machine's share of the processes; return where rank 0 saves."""
    from pydantic import ValidationError

    from tasks.core.config import format_validation_error

    spec_file = launch_files(out_dir, 0)[0]
    deadline = time.monotonic() + wait_s
    while not spec_file.is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"{spec_file}: machine 0 wrote no job there within {wait_s:.0f} s; start the run's "
                              "train step (machine 0) and give every machine the same runs_dir path")
        time.sleep(1)
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    if spec["cfg"]["num_machines"] < 2:
        raise ConfigError(f"{spec_file}: the job trains on one machine (train.num_machines=1); nothing to join")
    try:
        cfg = TrainConfig.model_validate({**spec["cfg"], "machine_rank": machine_rank})
    except ValidationError as e:
        raise ConfigError(format_validation_error(f"--machine-rank {machine_rank}", e)) from None
    return train_distributed(Path(spec["formatted_dir"]), spec["model_dir"], Path(spec["out_dir"]), cfg, cores)


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train.join TRAIN_DIR --machine-rank N`: this machine's share of a job that spans
    machines; the workers' progress to stderr, a failure as one line."""
    import argparse
    import logging

    from tasks.core.settings import apply_defaults

    parser = argparse.ArgumentParser(prog="python -m tasks.train.join", description=join_training.__doc__)
    parser.add_argument("train_dir", type=Path, help="the run's train dir on the shared runs_dir (runs/<run-id>/train)")
    parser.add_argument("--machine-rank", type=int, required=True, help="this machine's rank, 1 to num_machines-1")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for machine 0's job (default 600)")
    args = parser.parse_args(argv)
    apply_defaults()  # OMP_WAIT_POLICY=PASSIVE and the rest, as `sftflow run` has them
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        saved = join_training(args.train_dir, args.machine_rank, args.wait)
    except (errors.SftflowError, RuntimeError) as e:
        print(f"join: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, errors.SftflowError) else 1
    print(f"join: machine {args.machine_rank} done; machine 0's rank 0 saves the result to {saved}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
