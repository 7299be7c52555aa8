"""Builds the optional native extension ``trojanguard._C`` (pybind11; does not link libtorch).

C++ CPU kernels always (with OpenMP where the compiler takes -fopenmp); CUDA kernels too where ``nvcc`` and a
CUDA toolkit are found (``TROJANGUARD_NO_CUDA=1`` skips them; ``TORCH_CUDA_ARCH_LIST`` picks the GPUs). The
extension is optional: if it cannot be built the package still installs, trojanguard._native tries a
just-in-time build from csrc/ when run from a source tree, and otherwise every op uses its PyTorch reference.
Compiler flags and source lists live in csrc/build_config.py, shared with the just-in-time build.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("trojanguard_build_config", ROOT / "csrc" / "build_config.py")
config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config)
SOURCES = config.sources(ROOT / "csrc")


class BuildExt(build_ext):
    """Adds optimisation and OpenMP flags, and compiles the .cu sources with nvcc when it is available."""

    def build_extensions(self):
        for ext in self.extensions:
            ext.extra_compile_args += config.CXX_FLAGS
            if has_flag(self.compiler, config.OPENMP_FLAG):
                ext.extra_compile_args.append(config.OPENMP_FLAG)
                ext.extra_link_args.append(config.OPENMP_FLAG)
            note = self._add_cuda(ext)
            if note:
                ext.define_macros.append((config.CUDA_NOTE_DEFINE, f'"{note}"'))
                print(f"trojanguard._C: building without CUDA ({note})", file=sys.stderr)
        super().build_extensions()

    def _add_cuda(self, ext) -> str:
        """Compile csrc/cuda/*.cu into objects linked into ``ext``; returns why not, or '' on success."""
        nvcc = config.find_nvcc()
        if nvcc is None:
            return f"nvcc not found at build time or {config.NO_CUDA_ENV}=1"
        if not SOURCES["cuda"]:
            return "no CUDA sources"
        build_temp = Path(self.build_temp) / "cuda"
        build_temp.mkdir(parents=True, exist_ok=True)
        try:
            arch_flags = config.nvcc_arch_flags(nvcc)
            link_args = config.cudart_static_link_args(nvcc)
            objects = []
            for source in SOURCES["cuda"]:
                obj = build_temp / (source.stem + ".o")
                cmd = [nvcc, "-c", str(source), "-o", str(obj), *config.NVCC_FLAGS, *arch_flags,
                       f"-D{config.CUDA_DEFINE}"]
                print(" ".join(cmd), file=sys.stderr)
                subprocess.run(cmd, check=True)
                objects.append(str(obj))
        except (OSError, ValueError, subprocess.CalledProcessError) as error:
            return f"nvcc failed at build time: {error}".replace('"', "'")
        ext.extra_objects += objects
        ext.extra_link_args += link_args
        ext.define_macros.append((config.CUDA_DEFINE, "1"))
        return ""


ext_modules = [
    Pybind11Extension(
        "trojanguard._C",
        [str(p.relative_to(ROOT)) for p in SOURCES["bindings"] + SOURCES["cpu"]],
        include_dirs=["csrc"],
        depends=[str(p.relative_to(ROOT)) for p in SOURCES["headers"] + SOURCES["cuda"]],
        cxx_std=17,
        optional=True,
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
