"""A tiny random llama with the default base model's tokenizer and chat template: the model the tests and the
orchestration benchmark train when what they measure is the pipeline, not the model."""

from __future__ import annotations

import re
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


def build_tiny_gguf(out: Path, model_dir: Path | None = None, quantized: bool = False) -> Path:
    """Write the tiny llama of `build_tiny_model` (the one in `model_dir`, else a new one) as a GGUF file `out` with
    the packaged GGUF's tokenizer, chat template and metadata, and return it: a base model given by a GGUF spec,
    converted as the default one is, in seconds rather than a minute (the tests of a version that loads on another
    machine). Its tensors are F32, or with `quantized` each in the packaged file's type for that tensor (Q4_1 and Q8_0
    blocks), so that converting it de-quantizes as converting the default base does."""
    import json
    import tempfile

    import gguf
    from safetensors.numpy import load_file

    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_gguf

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir or build_tiny_model(Path(tmp))
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        weights = load_file(model_dir / "model.safetensors")
    source = gguf.GGUFReader(resolve_gguf(DEFAULT_BASE_MODEL))
    writer = gguf.GGUFWriter(str(out), "llama")
    dims = {"llama.block_count": config["num_hidden_layers"], "llama.context_length": config["max_position_embeddings"],
            "llama.embedding_length": config["hidden_size"], "llama.feed_forward_length": config["intermediate_size"],
            "llama.attention.head_count": config["num_attention_heads"],
            "llama.attention.head_count_kv": config["num_key_value_heads"],
            "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
            "general.file_type": source.fields["general.file_type"].contents() if quantized else 0}  # 0: all F32
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer's own
        kind = field.types[0]
        value = dims.get(key, field.contents())
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for layer in range(config["num_hidden_layers"]):
        names |= {f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{g}.weight" for hf, g in per_layer.items()}
    def role(name: str) -> str:  # a tensor's name with its block number left out: the same role in every block
        return re.sub(r"^blk\.\d+\.", "blk.", name)

    types = {role(t.name): t.tensor_type for t in source.tensors}  # the packaged file's type per role (norms: F32)
    for hf_name, tensor in weights.items():
        name, data = names[hf_name], tensor.astype("float32")
        kind = types.get(role(name), gguf.GGMLQuantizationType.F32)
        if quantized and kind != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
