"""The compute dtype follows what the hardware does natively; the hardware probes are patched to each kind of CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.core.config import TrainConfig
from tasks.core.errors import ConfigError
from tasks.model import modeling, precision
from tasks.train.trainer import check_train_config, sft_config

AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC these timings come from
AMX = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}


@pytest.fixture(autouse=True)
def unforced(monkeypatch):
    """No SFTFLOW_COMPUTE_DTYPE from outside (a shell, a make test run): these tests decide it themselves."""
    monkeypatch.delenv(precision.COMPUTE_DTYPE_ENV, raising=False)
    for name in precision.ONEDNN_ISA_ENV:  # nor an instruction-set limit on oneDNN
        monkeypatch.delenv(name, raising=False)


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


@pytest.mark.parametrize("flags, forced", [(AMX, "fp32"), (AVX512_BF16, "fp32"), (AVX2_ONLY, "fp32"), (AMX, "bf16")])
def test_sftflow_compute_dtype_forces_the_dtype_of_an_auto_config_and_says_so(cpu, monkeypatch, tmp_path, flags,
                                                                               forced):
    cpu(flags)
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", forced)
    chosen = modeling.model_precision("auto")
    assert (chosen.name, chosen.reason) == (forced, f"forced by SFTFLOW_COMPUTE_DTYPE={forced} "
                                                    "(train.compute_dtype is auto)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[forced]
    assert modeling.quantization_config(chosen).bnb_4bit_compute_dtype == dtype  # what the trainer gets
    assert sft_config(TrainConfig(), tmp_path, chosen).bf16 == (forced == "bf16")


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_a_onednn_limit_below_bf16_makes_auto_compute_in_fp32_and_says_why(cpu, monkeypatch, variable):
    cpu(AVX512_BF16)
    monkeypatch.setenv(variable, "AVX2")
    monkeypatch.setattr(precision, "onednn_runs_bf16", lambda: False)
    chosen = modeling.model_precision("auto")
    assert (chosen.name, chosen.reason) == ("fp32", f"CPU Test CPU has native bf16 (avx512_bf16), but {variable}=AVX2 "
                                                    "keeps torch's oneDNN from it: bf16 would be emulated, over 10x "
                                                    "slower")
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", "bf16")  # forced anyway: the reason names the cost
    assert "emulates bf16" in modeling.model_precision("auto").reason


@pytest.mark.parametrize("runs_bf16", [True, None])
def test_a_onednn_limit_that_keeps_bf16_or_a_torch_without_the_probe_leaves_bf16(cpu, monkeypatch, runs_bf16):
    cpu(AMX)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    monkeypatch.setattr(precision, "onednn_runs_bf16", lambda: runs_bf16)
    assert modeling.model_precision("auto").name == "bf16"


def test_the_real_onednn_limit_reaches_the_choice_and_the_benchmarks_cpu_line():
    """Unpatched, in a fresh process, as `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` reproduces an AVX2 CPU:
    torch's own probe says oneDNN has no bf16, and auto takes fp32 (on any CPU)."""
    env = {k: v for k, v in os.environ.items() if k != precision.COMPUTE_DTYPE_ENV}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    code = ("import torch; from tasks.model.precision import choose_precision, cpu_summary, onednn_runs_bf16; "
            "print(choose_precision('auto', False).name, onednn_runs_bf16(), torch.backends.cpu.get_cpu_capability()); "
            "print(cpu_summary())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.splitlines()
    assert out[0] == "fp32 False AVX2"
    assert out[1].endswith("; torch limited to ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2")


def test_forced_bf16_on_an_avx2_only_cpu_names_the_cost_of_emulation(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", " BF16 ")  # case and spaces forgiven
    chosen = modeling.model_precision("auto")
    assert chosen.name == "bf16"
    assert chosen.reason == ("forced by SFTFLOW_COMPUTE_DTYPE=bf16 (train.compute_dtype is auto), although CPU Test "
                             "CPU emulates bf16 (over 10x slower than fp32)")


@pytest.mark.parametrize("configured, forced", [("fp32", "bf16"), ("bf16", "fp32")])
def test_an_explicit_train_compute_dtype_wins_over_the_variable(cpu, monkeypatch, configured, forced):
    cpu(AMX)
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", forced)
    chosen = modeling.model_precision(configured)
    assert (chosen.name, chosen.reason) == (configured, f"set by train.compute_dtype={configured}")


def test_an_empty_variable_leaves_the_choice_to_the_hardware_and_a_bad_one_names_the_fix(cpu, monkeypatch):
    cpu(AMX)
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", "")
    assert modeling.model_precision("auto").name == "bf16"
    for bad in ("fp16", "float32"):
        monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", bad)
        with pytest.raises(ConfigError) as err:
            modeling.model_precision("auto")
        assert str(err.value) == (f"SFTFLOW_COMPUTE_DTYPE='{bad}' is not a dtype this variable can force: set it to "
                                  "bf16 or fp32, or unset it to let the hardware decide")


@pytest.mark.parametrize("flags, forced, other", [(AMX, "", "fp32"), (AVX512_BF16, "", "fp32"), (AVX2_ONLY, "", "bf16"),
                                                 (AMX, "fp32", "bf16"), (AVX2_ONLY, "bf16", "fp32")])
def test_make_tests_second_dtype_is_the_one_an_auto_run_does_not_compute_in(cpu, monkeypatch, flags, forced, other):
    cpu(flags)
    monkeypatch.setenv("SFTFLOW_COMPUTE_DTYPE", forced)  # the first run's dtype, forced or not, is covered already
    assert precision.other_compute_dtype(cuda=False) == other != modeling.model_precision("auto").name


def test_on_a_cuda_device_with_fp16_only_the_second_dtype_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    assert precision.other_compute_dtype(cuda=True) == "fp32"


def test_fp16_on_a_cpu_stops_before_training_with_the_fix(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    monkeypatch.setattr("tasks.train.trainer.has_cuda", lambda: False)
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


@pytest.mark.parametrize("flags, method, compute_dtype, expected", [
    (AMX, "qlora", "auto", "bf16"), (AVX512_BF16, "qlora", "auto", "bf16"), (AVX2_ONLY, "qlora", "auto", "fp32"),
    (AMX, "qlora", "fp32", "fp32"), (AVX2_ONLY, "qlora", "bf16", "bf16"),
    (AMX, "lora", "auto", "fp32"), (AMX, "full", "bf16", "fp32"), (AVX512_BF16, "lora_8bit", "auto", "fp32")])
def test_a_version_is_served_in_the_dtype_evaluate_computed_it_in(cpu, flags, method, compute_dtype, expected):
    """`sftflow serve --dtype auto`: a 4-bit base computes in train.compute_dtype's choice (bitsandbytes' compute
    dtype), a full-precision or 8-bit base loads in fp32 on a CPU and evaluate runs it without autocast."""
    cpu(flags)
    assert modeling.evaluation_precision(method, compute_dtype).name == expected


def test_on_cuda_every_method_is_served_in_its_compute_dtype(monkeypatch):
    monkeypatch.setattr(modeling, "has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    assert {modeling.evaluation_precision(m).name for m in ("qlora", "lora", "full")} == {"bf16"}
