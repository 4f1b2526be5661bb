"""The kernels training picks per device (the libraries' GPU fast paths on CUDA, sftflow's CPU paths on a CPU),
tested with the CUDA probes patched as the dtype choice is; and the utilisation ledger's arithmetic."""

from __future__ import annotations

import pytest

from tasks.train import utilisation
from tasks.train.fast_paths import choose_kernels
from tasks.train.utilisation import Peak, cpu_flops_per_cycle, flops_per_token, ledger


def everything(module: str) -> bool:
    return True


def nothing(module: str) -> bool:
    return False


def test_a_cpu_keeps_sftflows_packed_attention_and_lean_loss_whatever_is_installed():
    kernels = choose_kernels(False, None, packing=True, lean_loss=True, has=everything)
    assert (kernels.attention, kernels.liger) == (None, False) and kernels.reason.startswith("CPU")


def test_an_ampere_or_newer_gpu_with_flash_attn_and_liger_takes_both():
    kernels = choose_kernels(True, (9, 0), packing=True, lean_loss=True, has=everything)
    assert (kernels.attention, kernels.liger) == ("flash_attention_2", True)
    assert "FlashAttention-2" in kernels.reason and "Liger" in kernels.reason


@pytest.mark.parametrize(("capability", "has", "packing", "why"), [
    ((7, 5), everything, True, "compute capability (7, 5) < 8.0"),  # a T4: no FlashAttention-2
    ((8, 0), nothing, True, "flash_attn is not installed"),
    ((8, 0), everything, False, "no packing"),
])
def test_a_gpu_without_what_flashattention_needs_falls_back_to_sdpa_and_says_why(capability, has, packing, why):
    kernels = choose_kernels(True, capability, packing=packing, lean_loss=True, has=has)
    assert kernels.attention == "sdpa" and why in kernels.reason
    assert kernels.liger == (has is everything)


def test_liger_replaces_the_lean_loss_only_where_the_lean_loss_is_on():
    assert not choose_kernels(True, (9, 0), packing=True, lean_loss=False, has=everything).liger


@pytest.mark.parametrize(("flags", "dtype", "amd", "per_cycle"), [
    ({"amx_bf16", "avx512_bf16", "avx512f"}, "bf16", False, 1024),  # Sapphire Rapids: AMX tiles
    ({"avx512_bf16", "avx512f"}, "bf16", True, 64),  # Zen 4: bf16 dot products on 256-bit datapaths
    ({"avx512_bf16", "avx512f"}, "bf16", False, 128),
    ({"avx512f", "fma", "avx2"}, "fp32", True, 32),
    ({"avx512f", "fma", "avx2"}, "fp32", False, 64),
    ({"fma", "avx2"}, "fp32", False, 32),  # AVX2-only: fp32, the dtype auto picks there
])
def test_peak_flops_per_cycle_follow_the_cpus_flags(flags, dtype, amd, per_cycle):
    assert cpu_flops_per_cycle(flags, dtype, amd)[0] == per_cycle


def test_bf16_emulated_on_an_avx2_cpu_counts_at_the_fp32_peak(monkeypatch):
    monkeypatch.setattr(utilisation, "cpu_flags", lambda: {"fma", "avx2"})
    monkeypatch.setattr(utilisation, "cpu_mhz", lambda: 3000.0)
    monkeypatch.setattr(utilisation, "is_amd", lambda: True)
    peak = utilisation.device_peak("bf16", cuda=False, cores=2)
    assert peak.flops_per_s == 2 * 3000e6 * 32 and "emulated" in peak.how


def test_the_ledger_is_tokens_times_model_flops_over_the_peak_and_cost_follows_the_price():
    assert flops_per_token(100, 0) == 400 and flops_per_token(100, 100) == 600  # LoRA frozen base ~4N, full 6N
    peak = Peak(384e9, "2 cores x 3 GHz x 64")
    # the issue's own figures: ~282 input tok/s x ~0.55 GFLOP per token against ~384 GFLOP/s is ~40%
    book = ledger(tokens=282 * 3600, seconds=3600, params=135_000_000, trainable=2_400_000, peak=peak,
                  price_per_hour=0.5)
    assert book.mfu == pytest.approx(282 * (4 * 135e6 + 2 * 2.4e6) / 384e9) and 0.39 < book.mfu < 0.41
    assert book.device_hours == pytest.approx(1.0) and book.cost == pytest.approx(0.5)
    assert set(book.metrics()) == {"train/achieved_tflops", "train/device_hours", "train/mfu", "train/cost"}
    unknown = ledger(10, 1, 100, 0, Peak(None, "no clock"))
    assert unknown.mfu is None and unknown.cost is None and "MFU unknown" in unknown.line()
