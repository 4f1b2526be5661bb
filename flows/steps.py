"""The pipeline's steps, wired once: each step's task, how its arguments come from the run (config, paths, earlier
steps' results) and what it returns. The flow (flows/sft_pipeline.py) runs them in order, handing each result on;
`sftflow task STEP` (flows/single_task.py) runs one, taking what earlier steps returned from the run's saved
layout instead, and so does a step placed on another work pool (flows/placement.py). A new step is one entry in STEPS
(and its name in tasks.core.config.STEP_NAMES)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.core.config import PipelineConfig, RunPaths
from tasks.core.redact import redact
from tasks.data.clean import clean
from tasks.data.data_gate import config_digest
from tasks.data.ingest import fingerprint_data, ingest
from tasks.data.validate import validate, validation_args
from tasks.evaluate.evaluate import evaluate_adapter
from tasks.formatting.chat_format import format_chats
from tasks.model.modeling import trained_model_dir
from tasks.model.prepare import prepare_base_model
from tasks.registry.register import pipeline_tags, register_model
from tasks.registry.registry import champion_to_compare
from tasks.serving.serve import served_answers
from tasks.train.monitoring import run_tracking
from tasks.train.train import train_adapter


@dataclass
class RunContext:
    """What a step's arguments come from: the config, the run's paths, and the results of the steps before it. A
    result no step has handed over in this process (`sftflow task`) is read from where that step writes it."""

    cfg: PipelineConfig
    run: RunPaths
    flow_run_id: Any = None
    results: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        if name not in self.results:
            self.results[name] = self.saved(name)
        return self.results[name]

    def saved(self, name: str) -> Any:
        """Return an earlier step's result as the run's layout holds it."""
        cfg, run = self.cfg, self.run
        return {
            "fingerprint": lambda: fingerprint_data(cfg.data),
            "base": lambda: prepare_base_model.fn(cfg.train.base_model, cfg.train.trust_remote_code),
            "raw_db": lambda: run.ingest_db, "clean_db": lambda: run.clean_db, "formatted": lambda: run.formatted,
            "adapter": lambda: trained_model_dir(run.train), "evaluation": lambda: run.eval,
        }[name]()

    def step_args(self, name: str) -> tuple:
        """Return step `name`'s arguments: from this context, or, for a step placed on another work pool, where its
        run is (flows/placement.py `run_placed`: it reads its inputs from the run's layout on that pool's machine)."""
        pool = self.cfg.orchestrate.placement.get(name)
        return (name, pool, self.placed_parameters(name)) if pool else STEPS[name].args(self)

    def placed_parameters(self, name: str) -> dict[str, Any]:
        """Return a placed step's flow run parameters: the run's address on the shared runs_dir, the MLflow URI with
        its credentials masked, and the data fingerprint this run was gated on. Paths and names, nothing large."""
        return {"step": name, "runs_dir": str(self.cfg.runs_dir.resolve()), "run_id": self.run.run_id,
                "tracking_uri": redact(self.cfg.tracking_uri()),
                "pipeline_flow_run_id": str(self.flow_run_id) if self.flow_run_id else None,
                "fingerprint": self.results.get("fingerprint")}

    def hand_over(self, name: str, result: Any) -> None:
        """Keep step `name`'s result for the steps after it; a placed step's is read from the run's layout."""
        if STEPS[name].returns and name not in self.cfg.orchestrate.placement:
            self.results[STEPS[name].returns] = result

    def champion(self):
        """Return the registry's @champion to score beside the new model (None when not compared)."""
        cfg = self.cfg
        if not cfg.evaluate.compare_champion:
            return None
        return champion_to_compare(cfg.tracking_uri(), cfg.registry.model_name, cfg.runs_dir / "champions",
                                   self["adapter"])


@dataclass(frozen=True)
class Step:
    """One pipeline step: its task, its arguments from a RunContext, the name its result goes by, and the task run
    name the UI shows (`sftflow task` spells the step `name`)."""

    name: str
    task: Any
    args: Callable[[RunContext], tuple]
    returns: str | None
    label: Callable[[PipelineConfig], str]


def train_label(cfg: PipelineConfig) -> str:
    t = cfg.train
    method = f"{t.method} r={t.lora_r}" if t.uses_lora else t.method
    return f"{method}, {t.max_steps} steps" if t.max_steps else f"{method}, {t.num_epochs:g} epochs"


def format_label(cfg: PipelineConfig) -> str:
    c = cfg.chat
    return f"{c.chat_template.name if c.chat_template else c.template} template, {c.mask} mask, {c.max_length} max"


STEPS = {step.name: step for step in (
    Step("prepare-base-model", prepare_base_model,
         lambda c: (c.cfg.train.base_model, c.cfg.train.trust_remote_code), "base",
         lambda cfg: Path(cfg.train.base_model).name),
    Step("ingest", ingest, lambda c: (c.cfg.data, c["fingerprint"], c.run.sources, c.run.ingest_db), "raw_db",
         lambda cfg: f"{len(cfg.data.sources)} source{'s' * (len(cfg.data.sources) != 1)}"),
    Step("validate-raw", validate, lambda c: validation_args("raw", c["raw_db"], c.run, c.cfg.validation), None,
         lambda cfg: "raw rows"),
    Step("clean", clean, lambda c: (c["raw_db"], c.run.clean_db, c.run.clean_report, c.run.quarantine, c.cfg.clean,
                                    c.cfg.data.on_bad_rows), "clean_db",
         lambda cfg: f"max {cfg.clean.max_chars} chars, {cfg.clean.heldout_fraction:.0%} held out"),
    Step("validate", validate, lambda c: validation_args("clean", c["clean_db"], c.run, c.cfg.validation), None,
         lambda cfg: "clean rows"),
    Step("format", format_chats, lambda c: (c["clean_db"], c["base"], c.run.formatted, c.cfg.chat, c.run.quarantine),
         "formatted", format_label),
    Step("validate-tokens", validate,
         lambda c: validation_args("tokenized", c["formatted"], c.run, c.cfg.validation), None,
         lambda cfg: "tokenized rows"),
    Step("train", train_adapter, lambda c: (c["formatted"], c["base"], c.run.train, c.cfg.train,
                                            run_tracking(c.cfg, c.run.run_id), c.cfg.orchestrate.train_slots),
         "adapter", train_label),
    Step("evaluate", evaluate_adapter, lambda c: (c["formatted"], c["base"], c["adapter"], c.run.eval, c.cfg.evaluate,
                                                  c.cfg.train, c.champion()),  # scored on the same prompts
         "evaluation", lambda cfg: f"{cfg.evaluate.max_samples} prompts"),
    Step("register", register_model,
         lambda c: (c.cfg.tracking_uri(), c.cfg.artifact_root(), c.run, c["base"], c["adapter"], c["evaluation"],
                    pipeline_tags(c["fingerprint"], c.flow_run_id, c.run.config, config_digest(c.cfg)),
                    c.cfg.registry, c.cfg.train.method, {"served": served_answers}),  # parity: as served too
         "registered",
         lambda cfg: f"{cfg.registry.model_name}, gate {cfg.registry.gate_metric}"),
)}
def run_names(cfg: PipelineConfig) -> dict[str, str]:
    """Return each step's task run name: the step (as `sftflow task` spells it) and what it runs with."""
    return {name: f"{name}[{step.label(cfg)}]" for name, step in STEPS.items()}
