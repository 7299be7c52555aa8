"""How ``trojanguard._C`` is compiled: shared by setup.py (ahead of time) and trojanguard._native (just in time).

Standard library only: setup.py loads this file by path before torch or trojanguard can be imported.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent
CXX_STANDARD = "c++17"
# -fno-math-errno lets sqrt vectorise and -fno-trapping-math lets GCC turn float selects into blends (values
# are unchanged: only FP exception flags may differ); no -march=native: a build must run on any CPU of its
# architecture (the CPU kernel carries its own AVX2 clone, chosen at load time).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]
OPENMP_FLAG = "-fopenmp"
NVCC_FLAGS = ["-O3", f"-std={CXX_STANDARD}", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
CUDA_DEFINE = "TROJANGUARD_WITH_CUDA"
CUDA_NOTE_DEFINE = "TROJANGUARD_CUDA_NOTE"
# Compute capabilities of an ahead-of-time build without TORCH_CUDA_ARCH_LIST (those nvcc knows), plus PTX of
# the newest for later GPUs.
DEFAULT_CUDA_ARCHS = ("75", "80", "86", "89", "90", "100", "120")
NO_CUDA_ENV = "TROJANGUARD_NO_CUDA"


def sources(root: Path = CSRC) -> dict[str, list[Path]]:
    """The extension's sources by part: bindings, cpu (C++), cuda (.cu), headers."""
    return {
        "bindings": [root / "bindings.cpp"],
        "cpu": sorted((root / "cpu").glob("*.cpp")),
        "cuda": sorted((root / "cuda").glob("*.cu")),
        "headers": sorted(root.glob("*.h")) + sorted(root.glob("*/*.h")) + sorted(root.glob("*/*.cuh")),
    }


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, PATH, or /usr/local/cuda; None if absent or TROJANGUARD_NO_CUDA=1."""
    if os.environ.get(NO_CUDA_ENV, "") not in ("", "0"):
        return None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cuda_homes(nvcc: str) -> list[Path]:
    """Candidate toolkit roots for ``nvcc``: where nvcc itself says it lives (it may be a wrapper script),
    its resolved path, $CUDA_HOME / $CUDA_PATH, /usr/local/cuda."""
    homes = []
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], check=False, capture_output=True, text=True,
                                timeout=60)
        here = re.findall(r"^#\$ _HERE_=(.+)$", dryrun.stderr + dryrun.stdout, re.MULTILINE)
        homes += [Path(m).parent for m in here]
    except (OSError, subprocess.SubprocessError):
        pass
    homes.append(Path(nvcc).resolve().parent.parent)
    homes += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    homes.append(Path("/usr/local/cuda"))
    return list(dict.fromkeys(homes))


def cudart_static_link_args(nvcc: str) -> list[str]:
    """Link the CUDA runtime statically: the extension then needs only the driver, not a libcudart on the path."""
    homes = cuda_homes(nvcc)
    for home in homes:
        for directory in [home / "lib64", home / "lib", *sorted((home / "targets").glob("*/lib"))]:
            if (directory / "libcudart_static.a").is_file():
                return [str(directory / "libcudart_static.a"), "-ldl", "-lrt", "-lpthread"]
    raise FileNotFoundError(f"libcudart_static.a not found under {', '.join(map(str, homes))}")


def nvcc_arch_flags(nvcc: str, capabilities: list[str] | None = None) -> list[str]:
    """-gencode flags: for ``capabilities`` (e.g. ["90"], the GPUs present, for a just-in-time build), else
    for $TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX"), else DEFAULT_CUDA_ARCHS with PTX of the newest; always
    limited to what this nvcc supports."""
    supported = _nvcc_archs(nvcc)
    ptx: set[str] = set()
    if capabilities is None:
        requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if requested.strip():
            capabilities = []
            for item in re.split(r"[;\s,]+", requested.strip()):
                arch = item.replace("+PTX", "").replace(".", "")
                if arch.isdigit():
                    capabilities.append(arch)
                    if item.endswith("+PTX"):
                        ptx.add(arch)
        else:
            capabilities = list(DEFAULT_CUDA_ARCHS)
            ptx = {max((a for a in capabilities if not supported or a in supported), key=int, default="")}
    chosen = [a for a in dict.fromkeys(capabilities) if not supported or a in supported]
    if not chosen:
        raise ValueError(f"none of the compute capabilities {capabilities} is supported by {nvcc}")
    flags = []
    for arch in chosen:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if arch in ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def _nvcc_archs(nvcc: str) -> set[str]:
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], check=False, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"compute_(\d+)", out))
