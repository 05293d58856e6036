"""The engine's dtype when the settings leave it to the machine (`dtype: auto`).

bfloat16 is fast only where the hardware computes in it: GPUs, and CPUs with bfloat16 instructions
(x86 AVX512-BF16 or AMX, Arm's BF16 extension). Elsewhere PyTorch emulates it, and a CPU with only
AVX2 ran the bundled embedding model 5.6 times slower in bfloat16 than in float32 (vLLM offline,
Banking77 texts: 23.6 against 131 texts/s on a 2-core AMD EPYC). vLLM's own "auto" picks bfloat16 on
every x86 and Arm CPU, so the choice is made here: bfloat16 where it is native, float32 on any
other CPU. float16 is never chosen on a CPU: it is emulated on all of them.

An explicit dtype (`SMALLFIRST_INFERENCE_DTYPE`, `--dtype`) is passed to vLLM as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
# /proc/cpuinfo flags of CPUs that compute in bfloat16: x86 ("flags") and Arm ("Features").
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO_PATH = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU listed in the text of /proc/cpuinfo (x86 and Arm)."""
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def read_cpu_flags(path: Path = CPUINFO_PATH) -> frozenset[str] | None:
    """This machine's CPU flags; None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return cpu_flags(path.read_text(errors="replace"))
    except OSError:
        return None


def resolve_dtype(requested: str, *, on_cpu: bool, flags: frozenset[str] | None) -> DtypeChoice:
    """The dtype to give vLLM for `requested` on this machine (`flags`: its CPU's, None if unknown)."""
    if requested != AUTO:
        return DtypeChoice(requested, "set in the settings")
    if not on_cpu:
        return DtypeChoice("bfloat16", "accelerator")
    if flags is None:
        # No way to tell (not Linux): the type every CPU computes natively.
        return DtypeChoice("float32", "CPU of unknown features")
    native = sorted(flags & NATIVE_BF16_CPU_FLAGS)
    if native:
        return DtypeChoice("bfloat16", f"CPU with native bfloat16 ({', '.join(native)})")
    return DtypeChoice("float32", "CPU without bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 flag)")


def platform_dtype(requested: str = AUTO) -> DtypeChoice:
    """`requested` resolved for the platform vLLM runs on in this process (imports vLLM): what the
    inference service runs in, and what benchmarks measure their baselines in."""
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    return resolve_dtype(requested, on_cpu=on_cpu, flags=read_cpu_flags() if on_cpu else None)
