"""The compute dtype follows what the hardware does natively; the hardware probes are patched to each kind of CPU."""

import pytest
import torch

from tasks import modeling, precision
from tasks.config import TrainConfig
from tasks.errors import ConfigError
from tasks.train import check_train_config, sft_config

AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC these timings come from
AMX = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to run on a CPU with the given flags and no CUDA device."""
    def use(flags):
        monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(precision, "cpu_name", lambda: "Test CPU")
        monkeypatch.setattr(modeling, "has_cuda", lambda: False)
    return use


def test_an_avx2_only_cpu_computes_in_fp32_and_says_why(cpu):
    cpu(AVX2_ONLY)
    chosen = modeling.model_precision("auto")
    assert chosen.name == "fp32" and chosen.torch_dtype == torch.float32
    assert chosen.reason == ("CPU Test CPU has no native bf16 (no AMX or AVX512-BF16): bf16 would be emulated, "
                             "over 10x slower")


@pytest.mark.parametrize("flags, flag", [(AMX, "amx_bf16"), (AVX512_BF16, "avx512_bf16")])
def test_a_cpu_with_amx_or_avx512_bf16_computes_in_bf16(cpu, flags, flag):
    cpu(flags)
    chosen = modeling.model_precision("auto")
    assert (chosen.name, chosen.reason) == ("bf16", f"CPU Test CPU has native bf16 ({flag})")


@pytest.mark.parametrize("flags, dtype, autocast_bf16", [(AVX2_ONLY, torch.float32, False),
                                                         (AMX, torch.bfloat16, True)])
def test_the_4bit_compute_dtype_and_the_trainers_autocast_follow_the_cpu(cpu, tmp_path, flags, dtype, autocast_bf16):
    cpu(flags)
    chosen = modeling.model_precision("auto")
    assert modeling.quantization_config(chosen).bnb_4bit_compute_dtype == dtype
    args = sft_config(TrainConfig(), tmp_path, chosen)
    assert (args.bf16, args.fp16, args.use_cpu) == (autocast_bf16, False, True)


def test_the_config_key_overrides_the_choice_and_names_the_cost_of_emulated_bf16(cpu):
    cpu(AMX)
    assert modeling.model_precision("fp32").name == "fp32"
    cpu(AVX2_ONLY)
    forced = modeling.model_precision("bf16")
    assert forced.name == "bf16" and "emulates bf16 (over 10x slower than fp32)" in forced.reason


def test_fp16_on_a_cpu_stops_before_training_with_the_fix(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    monkeypatch.setattr("tasks.train.has_cuda", lambda: False)
    with pytest.raises(ConfigError, match="train.compute_dtype=fp16 needs a CUDA device"):
        check_train_config(TrainConfig(compute_dtype="fp16"))


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_a_cuda_device_uses_bf16_where_it_has_it_and_fp16_mixed_precision_otherwise(monkeypatch, bf16_supported,
                                                                                     expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    assert precision.choose_precision("auto", cuda=True).name == expected


def test_the_real_probe_reads_this_machines_flags():
    flags = precision.cpu_flags()
    assert flags and precision.cpu_name()
    assert (precision.native_cpu_bf16(flags) is not None) == bool({"amx_bf16", "avx512_bf16"} & flags)
