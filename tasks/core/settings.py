"""sftflow's defaults for the environment of Prefect, MLflow, Great Expectations and Hugging Face, in one place.

The CLI, the make targets (through `sftflow env`), the flow itself (so a deployment's worker gets them too) and the
tests all apply these. A variable the user has set always wins. Nothing here runs at import time.

- Prefect keeps its database in the project (`.sftflow/prefect`, the one `make ui-prefect` serves), so runs started
  from the CLI show up in the UI.
- Prefect's temporary server gets PREFECT_STARTUP_TIMEOUT_S to start: its first start creates and migrates the
  database, which took 37 s on 2 busy cores (23 s with the database already migrated) against Prefect's 20 s.
- Analytics and telemetry are off everywhere; with Prefect's on, its heartbeat raced the run for the SQLite lock.
- OpenMP threads (torch's) sleep while they wait instead of spinning: on 2 cores shared with 2 busy processes a
  QLoRA forward + backward took 60-75 s with spinning threads and 16-19 s with OMP_WAIT_POLICY=PASSIVE; on an idle
  machine 5.4 s against 5.6 s.
- glibc's malloc keeps freed memory for reuse instead of returning it to the kernel at once (MALLOC_*_ below, and
  mallopt in this process): torch allocates and frees its CPU tensors every step, and with glibc's defaults each
  step faulted them in again. On a 2-core EPYC the model tests (tests/model/test_methods.py) made 3.1M page faults
  and spent 9 s of 43 CPU-s in the kernel; with these settings 1.2M and 4.5 s, 11% less CPU in all (PyTorch's CPU
  performance guide makes the same point with jemalloc or tcmalloc, which are not on every machine).
- Hugging Face's progress bars are off (HF_HUB_DISABLE_PROGRESS_BARS, HF_DATASETS_DISABLE_PROGRESS_BARS): a run
  loads its model 4-5 times, and each load drew a bar; the base model stage logs a Hub download itself. Set either
  variable to 0 to see them.
- A few library messages that every default run printed about the libraries' own internals are dropped
  (KNOWN_NOISE, each with its reason); every other warning still shows.
- The Hub stays reachable for users who have it (`train.base_model` may be a Hub id); the base model is resolved to
  a local directory before any other step, so nothing after that touches the Hub. HF_HUB_OFFLINE=1 forbids it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import warnings
from collections.abc import MutableMapping
from pathlib import Path

PREFECT_STARTUP_TIMEOUT_S = 180
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}


# glibc reads these when a process starts; `tune_malloc` applies them to a process already running. Allocations
# under 32 MiB (glibc's largest mmap threshold) come from the heap, and up to 1 GiB of freed heap is kept (256 MiB
# asked of the kernel at a time) rather than trimmed.
# variable: (value, mallopt's parameter number in malloc.h: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD)
MALLOC_TUNING = {"MALLOC_TRIM_THRESHOLD_": (1 << 30, -1), "MALLOC_TOP_PAD_": (256 << 20, -2),
                 "MALLOC_MMAP_THRESHOLD_": (32 << 20, -3)}


def tune_malloc(environ: MutableMapping[str, str]) -> bool:
    """Apply the MALLOC_*_ values in `environ` to this process through glibc's mallopt; return False where the C
    library is not glibc (musl, macOS): there the variables mean nothing and nothing is changed."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    for name, (_, param) in MALLOC_TUNING.items():
        value = environ.get(name, "")
        if value.isdigit() and not libc.mallopt(param, int(value)):
            return False
    return True


# Messages the libraries print on every default run about their own internals, none of which the user can act on:
# (logger, or None for a Python warning, and the start of the message, the reason it is dropped).
KNOWN_NOISE = [
    (None, "`is_gradient_checkpointing` is deprecated",  # FutureWarning, 3 per run
     "PEFT's PeftModel reads transformers' deprecated alias; nothing in sftflow does"),
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in",
     "register merges the adapter into the 4-bit base on purpose (its dtype is logged)"),
    ("transformers.tokenization_utils_tokenizers", "Ignoring clean_up_tokenization_spaces=True for BPE",
     "MLflow's text-generation pipeline asks for a cleanup that transformers rightly skips for BPE tokenizers"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional CPU kernel fetched from the Hub at run time; without it bitsandbytes uses its own, as intended"),
]


class DropMessages(logging.Filter):
    """Drop the records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Drop KNOWN_NOISE from this process's warnings and loggers (idempotent); every other warning still shows."""
    for logger, prefix, _ in KNOWN_NOISE:
        if logger is None:
            warnings.filterwarnings("ignore", message=re.escape(prefix), category=FutureWarning)
            continue
        target = logging.getLogger(logger)  # the library's own logger: it is created here if not imported yet
        if not any(isinstance(f, DropMessages) for f in target.filters):
            target.addFilter(DropMessages([p for name, p, _ in KNOWN_NOISE if name == logger]))


def cache_root() -> Path:
    """Return sftflow's cache of work done once per machine ($SFTFLOW_CACHE or ~/.cache/sftflow): converted base
    models, tokenizer proofs, training-slot holders."""
    return Path(os.environ.get("SFTFLOW_CACHE", Path.home() / ".cache" / "sftflow"))


def sftflow_home(environ: MutableMapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Return where sftflow keeps its local state: $SFTFLOW_HOME, else .sftflow in the working directory."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("SFTFLOW_HOME") or (cwd or Path.cwd()) / ".sftflow").resolve()


def default_environment(environ: MutableMapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Return sftflow's default value of every variable it manages (before the user's own values are applied)."""
    home = sftflow_home(environ, cwd)
    return {
        "SFTFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(PREFECT_STARTUP_TIMEOUT_S),
        # a task called outside a flow (sftflow task, task.fn()) logs to the console instead of warning about it
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        **TELEMETRY_OFF,
        "OMP_WAIT_POLICY": "PASSIVE",  # read when torch starts its thread pool: set before torch is imported
        "TOKENIZERS_PARALLELISM": "false",  # the tokenizers fork warning after DuckDB/torch threads have started
        # progress bars: transformers draws "Loading weights" for each of a run's 4-5 model loads, datasets one per map;
        # in a pipeline's log they are noise (stages log what they load). Read when the libraries are imported.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        **{name: str(value) for name, (value, _) in MALLOC_TUNING.items()},
    }


def apply_defaults(environ: MutableMapping[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Set every managed variable the user has not set in `environ` (default os.environ); return the result."""
    environ = os.environ if environ is None else environ
    for key, value in default_environment(environ, cwd).items():
        if not environ.get(key):
            environ[key] = value
    Path(environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if environ is os.environ:
        tune_malloc(environ)  # this process started before the variables were set
        quiet_known_noise()
    return {key: environ[key] for key in default_environment(environ, cwd)}


def shell_exports(environ: MutableMapping[str, str] | None = None) -> str:
    """Return `export KEY=VALUE` lines for the managed variables, for `eval "$(sftflow env)"` in a shell."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in apply_defaults(environ).items())
