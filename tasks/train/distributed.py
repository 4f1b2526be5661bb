"""Scale-out: run training in `train.num_processes` processes through `accelerate launch` (DDP or FSDP).

The train task stays one Prefect task: `train_distributed` writes a job spec and an accelerate config into the run's
train dir, starts `accelerate launch` (torch's elastic launcher underneath), forwards the workers' log lines to the
task's log and turns a failed worker into one error line. Each worker (`python -m tasks.train.distributed <spec.json>`)
builds the same trainer as the single-process path; rank 0 writes the adapter (or full model), the tokenizer and
log_history.json to the same places, and every rank records what it trained in `ranks/rank<N>.json`.

Across machines (`train.num_machines` > 1, accelerate's num_machines, machine_rank, main_process_ip and
main_process_port): the train step runs machine 0, which owns the train dir (clears another job's checkpoints, checks
the saved outputs) and writes the job there; every other machine joins the same job with `python -m
tasks.train.join TRAIN_DIR --machine-rank N` (tasks/train/join.py), which reads machine 0's job spec from the shared
train dir and launches its own share of the processes. The processes meet at machine 0's address over gloo (CPUs) or
NCCL (GPUs); rank 0 alone writes the outputs, and each rank its RNG state into the shared checkpoints.

Why not `accelerate launch --cpu`: in accelerate 1.15 `--cpu` takes the simple launcher, which starts ONE process
unless mpirun is installed (`--mpirun_hostfile`). The elastic launcher (`distributed_type: MULTI_GPU` or `FSDP`)
starts N processes on any machine; on a CPU the workers' `use_cpu` makes accelerate choose MULTI_CPU with gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from tasks.core import errors
from tasks.core.common import collect_garbage_less_often, stage_logger
from tasks.core.config import TrainConfig
from tasks.core.errors import ConfigError
from tasks.train.checkpoints import resumable_checkpoint, training_key
from tasks.train.methods import save_trained, saved_name

WORKER_LINE = "[rank "  # prefix of the lines the workers' sftflow logger writes; everything else is library noise


ZERO_STAGE = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}  # train.distributed -> DeepSpeed's ZeRO stage


def check_distributed_config(cfg: TrainConfig, cuda: bool) -> None:
    """Fail before launching on combinations that cannot run in several processes."""
    if cfg.distributed == "fsdp" and not cuda:
        # accelerate 1.15 turns FSDP on only for GPU-like devices; a CPU job would silently run DDP instead
        raise ConfigError("train.distributed=fsdp needs CUDA devices (accelerate has no FSDP for CPU processes); "
                          "use train.distributed=ddp on a CPU")
    if cfg.distributed in ZERO_STAGE and not cuda:
        raise ConfigError(f"train.distributed={cfg.distributed} needs CUDA devices (DeepSpeed's ZeRO shards over "
                          "GPUs with NCCL); use train.distributed=ddp on a CPU")
    if cfg.distributed in ("fsdp", "deepspeed_zero3") and cfg.method in ("qlora", "lora_8bit"):
        raise ConfigError(f"train.distributed={cfg.distributed} cannot shard the bitsandbytes-quantized base of "
                          f"method {cfg.method}; use train.distributed=ddp or deepspeed_zero2, or "
                          "train.method=lora/full")
    if cfg.distributed in ZERO_STAGE:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"train.distributed={cfg.distributed} needs the deepspeed package: pip install "
                              "deepspeed (on the GPU machines), or use train.distributed=ddp or fsdp")


def threads_per_process(num_processes: int, cores: int | None = None) -> int:
    """Return the torch (OpenMP) threads each process gets: the cores shared out, at least one."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // num_processes)


def free_port() -> int:
    """Return a TCP port nobody listens on now, for the rendezvous (so two jobs on one machine don't collide)."""
    from accelerate.utils.other import get_free_port

    return get_free_port()


def accelerate_config(cfg: TrainConfig, port: int, cuda: bool) -> dict:
    """Return the `accelerate launch` config of this machine: num_processes in all over num_machines, this machine's
    rank, DDP, FSDP or DeepSpeed ZeRO, nothing left to prompt for."""
    kind = {"fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}.get(cfg.distributed,
                                                                                             "MULTI_GPU")
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": kind, "num_processes": cfg.num_processes,
              "num_machines": cfg.num_machines, "machine_rank": cfg.machine_rank,
              "main_process_ip": cfg.main_process_ip or "127.0.0.1", "main_process_port": port,
              "rdzv_backend": "static", "same_network": True, "gpu_ids": "all", "use_cpu": not cuda, "debug": False,
              "mixed_precision": "no",  # the trainer's bf16/fp16 flags (tasks/model/precision.py) decide autocast
              "dynamo_config": {}, "enable_cpu_affinity": False}
    if cfg.distributed in ZERO_STAGE:
        # ZeRO-2 shards optimizer state and gradients, ZeRO-3 the weights too; "auto"-free values that must match the
        # trainer's (accumulation, clipping); stage 3 gathers a 16-bit copy so rank 0 can save whole weights
        config["deepspeed_config"] = {"zero_stage": ZERO_STAGE[cfg.distributed],
                                      "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                                      "gradient_clipping": cfg.max_grad_norm, "offload_optimizer_device": "none",
                                      "offload_param_device": "none",
                                      "zero3_init_flag": cfg.distributed == "deepspeed_zero3",
                                      "zero3_save_16bit_model": cfg.distributed == "deepspeed_zero3"}
    if cfg.distributed == "fsdp":
        # FSDP2 shards each transformer block (the model's _no_split_modules); frozen base weights and trainable
        # LoRA weights may share a block; rank 0 gathers the full state dict when the adapter is saved.
        config["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                 "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_reshard_after_forward": True,
                                 "fsdp_offload_params": False, "fsdp_cpu_ram_efficient_loading": False,
                                 "fsdp_activation_checkpointing": False}
    return config


def launch_command(config_file: Path, spec_file: Path, log_dir: Path) -> list[str]:
    """Return the `accelerate launch` command line that runs this module's worker on the job spec. torch's elastic
    agent keeps its per-rank files in `log_dir` (given none, it makes a folder in /tmp per launch and never removes
    it)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--log_dir", str(log_dir), "-m", "tasks.train.distributed", str(spec_file)]


def launch_env(num_processes: int, cuda: bool, cores: int | None = None) -> dict[str, str]:
    """Return the launcher's environment: this one, unbuffered output, the cores (`cores`, else all of this
    process's) shared out among this machine's `num_processes` processes, CPU forced if no GPU."""
    root = str(Path(__file__).resolve().parents[2])  # the workers import this package wherever the task runs
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(threads_per_process(num_processes, cores)))
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def launch_files(out_dir: Path, machine_rank: int) -> tuple[Path, Path]:
    """Return the job spec and accelerate config files of one machine's launch: machine 0's are the job's
    (distributed_job.json, accelerate_config.yaml), a joining machine's carry its rank."""
    suffix = f"-machine{machine_rank}" if machine_rank else ""
    return out_dir / f"distributed_job{suffix}.json", out_dir / f"accelerate_config{suffix}.yaml"


def write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a machine joining the job may read it the moment it appears."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def prepare_launch(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig,
                   cuda: bool, cores: int | None = None) -> tuple[list[str], dict[str, str]]:
    """Write the job spec and this machine's accelerate config into out_dir; return the launch command and its
    environment (this machine's workers share `cores`, else all of this process's)."""
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    # the job is the same on every machine (machine_rank 0): its workers compute one checkpoint key, so a joining
    # machine never takes machine 0's checkpoints for another job's; the rank goes to the accelerate config alone
    job = cfg.model_copy(update={"machine_rank": 0})
    spec = {"formatted_dir": str(formatted_dir), "model_dir": str(model_dir), "out_dir": str(out_dir),
            "cfg": job.model_dump(mode="json")}
    spec_file, config_file = launch_files(out_dir, cfg.machine_rank)
    port = cfg.main_process_port or free_port()  # several machines meet at the configured one
    write_atomically(spec_file, json.dumps(spec, indent=1))
    write_atomically(config_file, yaml.safe_dump(accelerate_config(cfg, port, cuda)))
    cmd = launch_command(config_file, spec_file, out_dir / "launcher" / f"machine{cfg.machine_rank}")
    return cmd, launch_env(cfg.num_processes // cfg.num_machines, cuda, cores)


def stream_launch(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run the launcher, forwarding worker lines to the stage log as they come; return its exit code and last lines."""
    logger, tail = stage_logger(), deque(maxlen=40)
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith(WORKER_LINE):
                    logger.info("%s", line)
                elif line:
                    tail.append(line)
                    logger.debug("%s", line)
        except BaseException:
            proc.terminate()  # a cancelled or killed task must not leave its workers training; torchrun stops them
            raise
    return proc.returncode, list(tail)


def failure(out_dir: Path, code: int, tail: list[str]) -> Exception:
    """Return the one-line error for a failed job: the first worker's own error, else the launcher's last line."""
    reports = sorted((out_dir / "ranks").glob("rank*.error.json"), key=lambda p: p.stat().st_mtime)
    if reports:
        first = json.loads(reports[0].read_text(encoding="utf-8"))
        kind = getattr(errors, first["type"], None)
        if isinstance(kind, type) and issubclass(kind, errors.SftflowError):
            return kind(first["message"])  # a bad config stays a user error: no retry repeats it
        reason = f"rank {first['rank']}: {first['type']}: {first['message']}"
    else:
        reason = tail[-1] if tail else "no output"
    return RuntimeError(f"train: distributed job failed (accelerate launch exited {code}); {reason}")


def train_distributed(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig,
                      cores: int | None = None) -> Path:
    """Train this machine's share of cfg.num_processes processes via `accelerate launch`, sharing `cores` (else all
    of this process's); return what rank 0 saved (adapter or model; on a machine > 0, where machine 0 saves it)."""
    from tasks.model.modeling import has_cuda

    cuda = has_cuda()
    check_distributed_config(cfg, cuda)
    if cfg.machine_rank == 0:  # machine 0 owns the train dir; a joining machine only adds its processes
        # once, here: a different job's checkpoints go and broken ones are removed before the ranks look at them
        resumable_checkpoint(out_dir, training_key(formatted_dir, model_dir, cfg))
        for stale in (out_dir / "ranks").glob("rank*.json"):
            stale.unlink()
    cmd, env = prepare_launch(formatted_dir, model_dir, out_dir, cfg, cuda, cores)
    machines = (f" over {cfg.num_machines} machines (this one rank {cfg.machine_rank}, meeting at "
                f"{cfg.main_process_ip}:{cfg.main_process_port})" if cfg.num_machines > 1 else "")
    stage_logger().info("train: accelerate launch, %d processes%s (%s, %s), %s threads each, config %s",
                        cfg.num_processes, machines, cfg.distributed, "nccl" if cuda else "gloo",
                        env["OMP_NUM_THREADS"], launch_files(out_dir, cfg.machine_rank)[1])
    code, tail = stream_launch(cmd, env)
    if code != 0:
        raise failure(out_dir, code, tail)
    saved = out_dir / saved_name(cfg)
    if cfg.machine_rank == 0 and not saved.is_dir():
        raise RuntimeError(f"train: accelerate launch exited 0 but rank 0 wrote no {saved}; last line: "
                           f"{tail[-1] if tail else 'no output'}")
    return saved


# ---- worker side: runs in every process that accelerate launch starts ----


def rank_env() -> tuple[int, int]:
    """Return this process's (rank, world size) as the launcher set them."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def setup_worker_logging(rank: int) -> None:
    """Send the sftflow logger to stdout with a rank prefix: rank 0 at INFO, the others only warnings and errors."""
    import logging

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{WORKER_LINE}{rank}] %(message)s"))
    logger = logging.getLogger("sftflow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


def record_rank(trainer, out_dir: Path, rank: int) -> None:
    """Write what this rank trained: world size, backend, optimizer steps and its share of the batches per epoch."""
    state = trainer.accelerator.state
    record = {"rank": rank, "world_size": state.num_processes, "backend": state.backend,
              "distributed_type": str(state.distributed_type).split(".")[-1], "global_step": trainer.state.global_step,
              "batches_per_epoch": len(trainer.get_train_dataloader())}
    (out_dir / "ranks" / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")


def run_worker(spec: dict) -> None:
    """Train this rank's share of the job described by `spec` (see prepare_launch) and save as rank 0.

    The same trainer, callbacks (each logs or stops on rank 0 only) and resume as tasks/train/train.py train_model; the
    launcher already cleared other jobs' checkpoints, so resuming here only reads.
    """
    cfg, out_dir, formatted = (TrainConfig.model_validate(spec["cfg"]), Path(spec["out_dir"]),
                               Path(spec["formatted_dir"]))
    rows = formatted / "train.parquet"
    if not rows.is_file():  # before ~10 CPU-s of imports: a machine that does not see the shared runs_dir says so now
        raise FileNotFoundError(f"{rows} is missing on this machine: every machine reads the formatted rows from the "
                                "shared runs_dir")
    from tasks.model.tokenizer import load_tokenizer
    from tasks.train.checkpoints import resume_training
    from tasks.train.trainer import build_trainer, training_callbacks

    trainer = build_trainer(formatted, spec["model_dir"], out_dir, cfg, training_callbacks(out_dir, cfg))
    resume_training(trainer, out_dir, training_key(formatted, spec["model_dir"], cfg), clear=False)
    record_rank(trainer, out_dir, trainer.args.process_index)
    save_trained(trainer, load_tokenizer(spec["model_dir"], formatted, cfg.trust_remote_code), out_dir, cfg)


def main(argv: list[str] | None = None) -> None:
    """Worker entry point: `python -m tasks.train.distributed <spec.json>`, started by accelerate launch in each
    process."""
    collect_garbage_less_often()
    spec_file = Path((argv or sys.argv[1:])[0])
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    rank, world = rank_env()
    setup_worker_logging(rank)
    (Path(spec["out_dir"]) / "ranks").mkdir(parents=True, exist_ok=True)
    try:
        run_worker(spec)
    except BaseException as err:  # record the cause (the launcher only sees an exit code), then fail as before
        report = {"rank": rank, "world_size": world, "type": type(err).__name__, "message": str(err).splitlines()[0]
                  if str(err) else ""}
        (Path(spec["out_dir"]) / "ranks" / f"rank{rank}.error.json").write_text(json.dumps(report), encoding="utf-8")
        raise


if __name__ == "__main__":
    main()
