"""Every CUDA source of the extension compiles, for sm_80 and sm_90, on machines with nvcc but no GPU.

The just-in-time build compiles csrc/cuda/ only where torch sees a CUDA device, so without this test a CUDA kernel
that does not compile would go unnoticed until it reached a GPU machine. Each (source, architecture) pair is compiled
on its own, compile-only, with the flags of the real build (build_config.NVCC_FLAGS, the -gencode flags of
build_config.nvcc_arch_flags and the CUDA define; the .cu files include their headers by relative path and need no
pybind11 or Python headers). Without nvcc every test is skipped, and says so.
"""

import importlib.util
import subprocess
import time

import helpers
import pytest

CSRC = helpers.ROOT / "csrc"
ARCHS = ("80", "90")
COMPILE_TIMEOUT_S = 300  # one source for one architecture takes seconds; the limit only stops a hung nvcc


def _build_config():
    """csrc/build_config.py, loaded by path as trojanguard._native and setup.py load it."""
    spec = importlib.util.spec_from_file_location("trojanguard_build_config", CSRC / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


CONFIG = _build_config()
CUDA_SOURCES = CONFIG.sources(CSRC)["cuda"]


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, arch, tmp_path):
    nvcc = CONFIG.find_nvcc()
    if nvcc is None:
        pytest.skip(f"nvcc not found ($CUDA_HOME, $CUDA_PATH, PATH, /usr/local/cuda) or {CONFIG.NO_CUDA_ENV}=1: "
                    "the CUDA sources are not compiled here")
    try:
        arch_flags = CONFIG.nvcc_arch_flags(nvcc, [arch])
    except ValueError as error:
        pytest.skip(f"{nvcc} cannot compile for sm_{arch}: {error}")
    assert arch_flags == ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd = [nvcc, *CONFIG.NVCC_FLAGS, *arch_flags, f"-D{CONFIG.CUDA_DEFINE}", "-c", str(source), "-o",
           str(tmp_path / f"{source.stem}.o")]
    start = time.monotonic()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    assert done.returncode == 0, f"`{' '.join(cmd)}` failed:\n{(done.stderr or done.stdout)[-4000:]}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0
    print(f"{source.name} for sm_{arch}: {time.monotonic() - start:.1f} s")
