"""The engine's dtype by default: bfloat16 only where the hardware computes in it (dtypes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallfirst.inference.dtypes import cpu_flags, read_cpu_flags, resolve_dtype
from smallfirst.inference.settings import InferenceSettings
from tests.inference_fixtures import require_vllm

AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm
"""


def test_given_auto_on_a_cpu_without_bfloat16_instructions_when_resolved_then_float32() -> None:
    choice = resolve_dtype("auto", on_cpu=True, flags=cpu_flags(AVX2_ONLY))

    assert choice.dtype == "float32"
    assert "no avx512_bf16" in choice.reason


@pytest.mark.parametrize("cpuinfo", [SAPPHIRE_RAPIDS, ARM_BF16], ids=["x86-amx", "arm-bf16"])
def test_given_auto_on_a_cpu_with_bfloat16_instructions_when_resolved_then_bfloat16(cpuinfo: str) -> None:
    assert resolve_dtype("auto", on_cpu=True, flags=cpu_flags(cpuinfo)).dtype == "bfloat16"


def test_given_auto_on_an_accelerator_when_resolved_then_bfloat16_whatever_the_cpu() -> None:
    assert resolve_dtype("auto", on_cpu=False, flags=cpu_flags(AVX2_ONLY)).dtype == "bfloat16"


def test_given_auto_where_the_cpu_cannot_be_read_when_resolved_then_float32() -> None:
    assert resolve_dtype("auto", on_cpu=True, flags=None).dtype == "float32"


@pytest.mark.parametrize("requested", ["bfloat16", "float16", "float32"])
def test_given_an_explicit_dtype_when_resolved_then_it_is_kept_on_any_machine(requested: str) -> None:
    assert resolve_dtype(requested, on_cpu=True, flags=cpu_flags(AVX2_ONLY)).dtype == requested
    assert resolve_dtype(requested, on_cpu=True, flags=cpu_flags(SAPPHIRE_RAPIDS)).dtype == requested


def test_given_no_cpuinfo_file_when_flags_are_read_then_none(tmp_path: Path) -> None:
    assert read_cpu_flags(tmp_path / "missing") is None
    (tmp_path / "cpuinfo").write_text(AVX2_ONLY)
    assert read_cpu_flags(tmp_path / "cpuinfo") == cpu_flags(AVX2_ONLY)


@pytest.mark.vllm
def test_given_default_settings_then_the_engine_gets_this_machines_choice_and_an_explicit_one_as_set() -> None:
    require_vllm()
    from vllm.platforms import current_platform

    from smallfirst.inference.engine import engine_args

    on_cpu = current_platform.is_cpu()
    expected = resolve_dtype("auto", on_cpu=on_cpu, flags=read_cpu_flags() if on_cpu else None).dtype

    assert InferenceSettings(model_path="m").dtype == "auto"
    assert engine_args(InferenceSettings(model_path="m")).dtype == expected
    assert engine_args(InferenceSettings(model_path="m", dtype="float16")).dtype == "float16"
