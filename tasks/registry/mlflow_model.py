"""The MLflow model a registered version carries: self-contained, so the standard MLflow APIs load and serve it on any
machine, with no sftflow cache, base model or Hub access there.

What is logged (artifact `model` of the version's run, an MLflow transformers model, task `llm/v1/chat`):
- the trained model as one full set of safetensors weights (fp32 on a CPU; the compute dtype on CUDA): a LoRA
  adapter merged into its base as it was trained and evaluated over it (a 4-bit or 8-bit base dequantized first),
  full weights (full, hft) as they are. Not the adapter over a referenced base: MLflow would record the base's local
  path (taken for a Hub id elsewhere), a PeftModel over a local base reloads with the LoRA-targeted weights
  re-initialised, and a 4-bit base cannot be serialised (mlflow#10878);
- the tokenizer with the chat template the rows were formatted with (`chat_template.jinja`, saved with the adapter),
  which `predict` renders chat messages with;
- a generation config that answers greedily and stops where evaluate stops (the template's end of turn and EOS), and
  evaluate's `max_new_tokens` and generation batch size as the defaults of its model_config;
- the `llm/v1/chat` signature, an input example (a held-out prompt), pinned pip requirements.

So `mlflow.transformers.load_model`, `mlflow.pyfunc.load_model(...).predict({"messages": [...]})` and
`mlflow models serve -m models:/NAME@champion --env-manager local` work wherever the store's artifacts can be read.
The price is the weights' size per version (538 MB for SmolLM2-135M in fp32). Before the version may take @champion,
the serving-parity check (tasks/registry/parity.py) compares this model's answers with evaluate's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

CHAT_TASK = "llm/v1/chat"
MODEL_ARTIFACT = "model"  # the logged model's name in its run
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "sentencepiece")
PROBE = ("sftflowprobeuser", "sftflowprobeanswer")  # contents to find the template's end-of-turn tokens


def pip_requirements() -> list[str]:
    """Return the logged model's pip requirements, pinned to the versions installed here (without a local tag such as
    +cpu: the CPU wheel is a build of the same release). Given explicitly: MLflow's inference would look for
    torchvision."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue  # not installed here, so not needed to load what was saved here
    return pinned


def end_of_turn_ids(tokenizer, eos: int | list[int] | None = None) -> list[int]:
    """Return the ids that end an answer: the chat template's end-of-turn special tokens (found by rendering a probe
    turn), the tokenizer's EOS and `eos` (the model's). What evaluate's stop_rate counts as stopping."""
    user, answer = PROBE
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = text.split(answer, 1)[1]
    ids = {t for t in tokenizer(after, add_special_tokens=False)["input_ids"] if t in special}
    ids |= {tokenizer.eos_token_id} - {None}
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids)


def merge_dtype():
    """Return the dtype the exported model is merged and saved in: fp32 on a CPU (bf16 weights would round the
    adapter's small deltas away), the compute dtype where CUDA computes in 16 bits (half the size)."""
    import torch

    from tasks.model.modeling import has_cuda, model_precision

    return model_precision("auto").torch_dtype if has_cuda() else torch.float32


def load_full_model(model_dir: str, trained_dir: Path, dtype, method: str = "lora",
                    trust_remote_code: bool = False) -> Any:
    """Return the trained model as plain full weights in `dtype`: full weights (full, hft) as they are, or the adapter
    merged into its base as it was trained and evaluated over it. A base quantized for training (qlora: 4-bit NF4,
    lora_8bit: 8-bit) loads quantized as then and is dequantized to `dtype` before the merge, so the merged weights
    are the ones evaluate's model computed with; merged into the exact base instead, 2 of the default run's 64
    held-out answers changed (docs/evaluation-and-registry.md)."""
    from transformers import AutoModelForCausalLM

    from tasks.model.modeling import check_adapter_weights, is_adapter_dir, load_base_model

    if not is_adapter_dir(trained_dir):
        return AutoModelForCausalLM.from_pretrained(str(trained_dir), dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code)
    from peft import PeftModel

    check_adapter_weights(trained_dir)
    if method in ("qlora", "lora_8bit"):
        base = load_base_model(model_dir, method == "qlora", load_in_8bit=method == "lora_8bit",
                               trust_remote_code=trust_remote_code).dequantize(dtype=dtype)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(trained_dir)).merge_and_unload()


def export_model(model_dir: str, trained_dir: Path, method: str = "lora",
                 trust_remote_code: bool = False, repetition_penalty: float = 1.0) -> tuple[Any, Any]:
    """Return (model, tokenizer) as they are logged: full weights (`load_full_model`: an adapter of train.method
    `method` merged into its base), the tokenizer with its chat template, a generation config that answers greedily
    with evaluate's `repetition_penalty` and stops at the template's end of turn."""
    from transformers import AutoTokenizer

    from tasks.core.errors import ConfigError

    # left padding: a batch of prompts (pyfunc over a list) must end where each answer starts
    tokenizer = AutoTokenizer.from_pretrained(str(trained_dir), trust_remote_code=trust_remote_code,
                                              padding_side="left")
    if not tokenizer.chat_template:
        raise ConfigError(f"{trained_dir}: the trained tokenizer has no chat template, so the logged chat model could "
                          "not render messages; retrain (training saves the template the rows were formatted with)")
    if tokenizer.pad_token is None:  # a batch needs one; it is masked out
        tokenizer.pad_token = tokenizer.eos_token
    model = load_full_model(model_dir, trained_dir, merge_dtype(), method, trust_remote_code)
    generation = model.generation_config
    stops = end_of_turn_ids(tokenizer, generation.eos_token_id)
    generation.eos_token_id = stops
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    generation.do_sample = False  # greedy, as evaluate's default: the same prompt, the same answer
    generation.repetition_penalty = repetition_penalty  # evaluate's (1.0: off), not whatever the base's config set
    for sampling in ("temperature", "top_p", "top_k"):
        setattr(generation, sampling, None)
    return model.eval(), tokenizer


def input_example(messages: list[dict], max_new_tokens: int) -> dict:
    """Return the logged input example: one chat request as `predict` and `/invocations` take it."""
    return {"messages": messages, "max_tokens": max_new_tokens}


def log_chat_model(model, tokenizer, example: dict, max_new_tokens: int, source: str = "sftflow model",
                   batch_size: int = 1):
    """Log `model` and `tokenizer` as an MLflow transformers chat model (`llm/v1/chat`, safetensors) under the active
    run; return its ModelInfo. Its default answer budget is `max_new_tokens` (evaluate's) and a request of several
    rows is generated `batch_size` rows at a time (left-padded); a loader may change either
    (`mlflow.pyfunc.load_model(uri, model_config={"batch_size": 4})`), and only keys logged here can be changed so.
    `source` is the name its answers give as `model` (not a Hub id: MLflow would look its card and license up
    there). MLflow checks the input example by loading what it saved and answering it."""
    import mlflow
    from huggingface_hub import ModelCard

    model.name_or_path = source  # else the base's local path, which MLflow records and answers with
    return mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name=MODEL_ARTIFACT, task=CHAT_TASK, input_example=example,
        torch_dtype=model.dtype, model_config={"max_new_tokens": max_new_tokens, "batch_size": batch_size},
        pip_requirements=pip_requirements(),
        # a placeholder (register logs the real card, README.md, next); its metadata block keeps huggingface_hub from
        # warning that it has none
        model_card=ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n# {source}\n"),
        metadata={"sftflow_weights": f"merged, {str(model.dtype).removeprefix('torch.')}"})


def log_trained_chat_model(model_dir: str, trained_dir: Path, example: dict, max_new_tokens: int,
                           method: str = "lora", trust_remote_code: bool = False, also_as: str | None = None,
                           source: str = "sftflow model", repetition_penalty: float = 1.0, batch_size: int = 1):
    """Log the trained model as the active run's MLflow chat model (`export_model`; `batch_size` its default rows
    per generation batch), and, given `also_as`, as plain safetensors with its tokenizer under that artifact path
    too; return the ModelInfo."""
    import mlflow

    model, tokenizer = export_model(model_dir, trained_dir, method, trust_remote_code, repetition_penalty)
    info = log_chat_model(model, tokenizer, example, max_new_tokens, source, batch_size)
    if also_as:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            mlflow.log_artifacts(tmp, artifact_path=also_as)
    return info
