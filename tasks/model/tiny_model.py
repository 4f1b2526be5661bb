"""A tiny random llama with the default base model's tokenizer and chat template: the model the tests and the
orchestration benchmark train when what they measure is the pipeline, not the model."""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(out: Path) -> Path:
    """Save a 2-layer random llama (hidden 64) with the SmolLM2 tokenizer and chat template from the packaged GGUF
    to `out` and return it. A wide init (0.4) gives logits enough range for LoRA on the linear layers to move them
    (0.02 would not)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_gguf

    gguf = resolve_gguf(DEFAULT_BASE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.4, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
