"""The native extension ``trojanguard._C`` (C++ CPU kernels; CUDA kernels where built): loading and launching.

Loading, on first use: the installed ``trojanguard._C`` if it is importable and current; otherwise (e.g.
running from the source tree with ``PYTHONPATH=src``) the same sources in ``csrc/`` are compiled just in time
with g++ (and nvcc for the CUDA part where a CUDA device is present) into ``$TROJANGUARD_CACHE/ext``
(default ``~/.cache/trojanguard/ext``), keyed by a hash of the sources, compilers, flags and Python.
``TROJANGUARD_NO_JIT=1`` turns the just-in-time build off. When there is no extension, ONE warning says why,
:func:`cpu_reasons` / :func:`cuda_reasons` keep the reasons, and every op falls back to its reference.

The extension does not link libtorch: its functions take raw data pointers, sizes, dtype codes and scalars,
and :func:`launch` runs one of them. Each op's glue (validation, contiguous copies, outputs allocated with
torch, the ``torch.ops.trojanguard.<op>`` custom-op registration) lives beside the op in ``trojanguard.ops``;
this module is a leaf and imports nothing of ``trojanguard.ops``.
"""

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

from trojanguard._locks import file_lock

API_VERSION = 2  # must equal kApiVersion in csrc/bindings.cpp
NO_JIT_ENV = "TROJANGUARD_NO_JIT"
CACHE_ENV = "TROJANGUARD_CACHE"
CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source tree, not in an installed wheel
# The extension's dtype codes, shared by every op (DType in csrc/mask_step_math.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class JITBuildError(RuntimeError):
    """The just-in-time build of the extension failed; the message says which step and why."""


@dataclass
class Extension:
    """The loaded extension (or None) with where it came from and why it is missing."""

    module: ModuleType | None
    origin: str = ""  # "installed" or the path of a just-in-time build
    reasons: list[str] = field(default_factory=list)
    cuda_note: str = ""  # why a just-in-time build left CUDA out
    _cuda_probe: str | None = None

    def cuda_probe(self) -> str:
        if self._cuda_probe is None:
            self._cuda_probe = self.module.cuda_probe() if hasattr(self.module, "cuda_probe") else ""
        return self._cuda_probe


_lock = threading.Lock()
_extension: Extension | None = None


def extension() -> Extension:
    """The extension, loaded (or built) on first call; warns once if there is none."""
    global _extension
    if _extension is None:
        with _lock:
            if _extension is None:
                loaded = _load()
                if loaded.module is None:
                    warnings.warn("trojanguard: native extension unavailable, ops use their PyTorch reference: "
                                  + "; ".join(loaded.reasons), RuntimeWarning, stacklevel=3)
                _extension = loaded
    return _extension


def _import_installed() -> ModuleType:
    return importlib.import_module("trojanguard._C")


def _load() -> Extension:
    reasons = []
    try:
        module = _import_installed()
    except ImportError as error:
        reasons.append(f"trojanguard._C is not installed ({error})")
    else:
        version = getattr(module, "API_VERSION", 0)
        if version == API_VERSION:
            return Extension(module, "installed")
        reasons.append(f"the installed trojanguard._C is out of date (API {version}, expected {API_VERSION}): "
                       "rebuild it with `pip install -e .`")
    if os.environ.get(NO_JIT_ENV, "") not in ("", "0"):
        return Extension(None, reasons=[*reasons, f"just-in-time build disabled by {NO_JIT_ENV}"])
    try:
        path, cuda_note = jit_build()
        return Extension(import_extension(path), str(path), cuda_note=cuda_note)
    except (JITBuildError, ImportError, OSError, ValueError, subprocess.SubprocessError) as error:
        return Extension(None, reasons=[*reasons, f"just-in-time build failed: {error}"])


def build_info() -> dict:
    """The extension's build details (``_C.build_info()``) plus where it was loaded from; {} without one."""
    ext = extension()
    if ext.module is None:
        return {}
    info = dict(ext.module.build_info())
    info["origin"] = ext.origin
    if ext.cuda_note:
        info["cuda_note"] = ext.cuda_note
    return info


# ---------------------------------------------------------------- just-in-time build
def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "trojanguard"
    return Path(root) / "ext"


def _build_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trojanguard_build_config", CSRC / "build_config.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    return config


def _compiler() -> list[str]:
    """The C++ compiler command: $CXX if set (may hold arguments), else c++ / g++ / clang++ from PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    raise JITBuildError("no C++ compiler found (install g++ or set CXX)")


def _version(cmd: list[str]) -> str:
    try:
        done = subprocess.run([*cmd, "--version"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise JITBuildError(f"compiler {shlex.join(cmd)!r} does not run: {error}") from error
    if done.returncode != 0:
        raise JITBuildError(f"compiler {shlex.join(cmd)!r} does not run: {done.stderr.strip()[:500]}")
    return done.stdout


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise JITBuildError(f"`{shlex.join(cmd)}` failed:\n{(done.stderr or done.stdout).strip()[-3000:]}")


def jit_build(cache: Path | None = None, with_cuda: bool | None = None) -> tuple[Path, str]:
    """Compile csrc/ into ``cache`` (default :func:`cache_dir`) unless an identical build is there.

    ``with_cuda``: compile the CUDA part too (default: where torch sees a CUDA device and nvcc is found).
    Returns (path of the module file, why CUDA was left out or ''). Concurrent builds wait on a lock file.
    """
    if not (CSRC / "build_config.py").is_file():
        raise JITBuildError(f"sources not found at {CSRC} (the just-in-time build needs a source tree)")
    config = _build_config()
    sources = config.sources(CSRC)
    cxx = _compiler()
    cxx_version = _version(cxx)
    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    nvcc, arch_flags, cuda_note = None, [], ""
    if not with_cuda:
        cuda_note = "just-in-time build without CUDA (no CUDA device at build time)"
    elif config.find_nvcc() is None:
        cuda_note = f"just-in-time build without CUDA (nvcc not found, or {config.NO_CUDA_ENV}=1)"
    else:
        capabilities = sorted({f"{major}{minor}" for major, minor in
                               (torch.cuda.get_device_capability(d) for d in range(torch.cuda.device_count()))})
        try:
            arch_flags = config.nvcc_arch_flags(config.find_nvcc(), capabilities or None)  # None: default GPUs
            config.cudart_static_link_args(config.find_nvcc())
            nvcc = config.find_nvcc()
        except (ValueError, OSError) as error:
            cuda_note = f"just-in-time build without CUDA ({error})"

    import pybind11

    includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    digest = hashlib.sha256()
    for path in [*sources["bindings"], *sources["cpu"], *sources["headers"], CSRC / "build_config.py",
                 *(sources["cuda"] if nvcc else [])]:
        digest.update(path.name.encode() + path.read_bytes())
    for item in [cxx_version, sys.version, sysconfig.get_config_var("EXT_SUFFIX"), pybind11.__version__,
                 *includes, *(arch_flags + [_version([nvcc]) if nvcc else ""])]:
        digest.update(str(item).encode())
    target_dir = (cache or cache_dir()) / digest.hexdigest()[:16]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = target_dir / f"_C{suffix}"
    if target.is_file():
        return target, cuda_note

    target_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(target_dir / "build.lock"):
        if target.is_file():  # built by another process while we waited
            return target, cuda_note
        with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
            cuda_note = _compile_and_link(config, sources, cxx, includes, nvcc, arch_flags, cuda_note, Path(tmp),
                                          target)
    return target, cuda_note


def _compile_and_link(config, sources, cxx, includes, nvcc, arch_flags, cuda_note, tmp: Path, target: Path) -> str:
    base = [*cxx, f"-std={config.CXX_STANDARD}", "-fPIC", *config.CXX_FLAGS, *includes]

    def compile_cxx(source: Path, extra: list[str]) -> Path:
        obj = tmp / f"{source.parent.name}_{source.stem}.o"
        _run([*base, *extra, "-c", str(source), "-o", str(obj)])
        return obj

    def compile_cpu(source: Path) -> tuple[Path, bool]:
        try:
            return compile_cxx(source, [config.OPENMP_FLAG]), True
        except JITBuildError:  # compiler without OpenMP: single-threaded kernels
            return compile_cxx(source, []), False

    def compile_cuda(source: Path) -> Path:
        obj = tmp / f"cuda_{source.stem}.o"
        _run([nvcc, *config.NVCC_FLAGS, *arch_flags, f"-D{config.CUDA_DEFINE}", "-c", str(source), "-o", str(obj)])
        return obj

    cuda_defines = [f"-D{config.CUDA_DEFINE}"] if nvcc else []
    with ThreadPoolExecutor(max_workers=4) as pool:
        cpu_jobs = [pool.submit(compile_cpu, s) for s in sources["cpu"]]
        cuda_jobs = [pool.submit(compile_cuda, s) for s in sources["cuda"]] if nvcc else []
        bindings_job = pool.submit(compile_cxx, sources["bindings"][0], cuda_defines)
        cpu = [job.result() for job in cpu_jobs]
        try:
            cuda_objects = [job.result() for job in cuda_jobs]
        except JITBuildError as error:
            cuda_objects, cuda_note = [], f"just-in-time build without CUDA: {str(error)[:1500]}"
        bindings = bindings_job.result()
    if nvcc and not cuda_objects:  # bindings were compiled for CUDA that did not build
        bindings = compile_cxx(sources["bindings"][0], [])
    link = [*cxx, "-shared", "-o", str(tmp / target.name), str(bindings), *(str(o) for o, _ in cpu),
            *(str(o) for o in cuda_objects)]
    if any(openmp for _, openmp in cpu):
        link.append(config.OPENMP_FLAG)
    if cuda_objects:
        link += config.cudart_static_link_args(nvcc)
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    _run(link)
    os.replace(tmp / target.name, target)
    return cuda_note


def import_extension(path: Path) -> ModuleType:
    """Import a built ``_C`` module file under a name of its own (``_trojanguard_ext_<dir>._C``): loading an
    extension registers it in sys.modules, which must not shadow or be shadowed by an installed trojanguard._C."""
    path = Path(path)
    name = "_trojanguard_ext_" + "".join(ch if ch.isalnum() else "_" for ch in path.parent.name) + "._C"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if getattr(module, "API_VERSION", 0) != API_VERSION:
        raise ImportError(f"{path} has API {getattr(module, 'API_VERSION', 0)}, expected {API_VERSION}")
    return module


# ---------------------------------------------------------------- availability
def cpu_reasons() -> list[str]:
    """Why the C++ CPU backend is unavailable here (empty: available)."""
    return list(extension().reasons)


def cuda_reasons() -> list[str]:
    """Why the CUDA backend is unavailable here (empty: available)."""
    ext = extension()
    if ext.module is None:
        return list(ext.reasons)
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA device (torch.cuda.is_available() is False)")
    if not ext.module.build_info()["cuda"]:
        note = ext.cuda_note or ext.module.build_info().get("cuda_note") or "nvcc not found at build time"
        reasons.append(f"trojanguard._C was built without CUDA ({note})")
    elif not reasons and ext.cuda_probe():
        reasons.append(f"the CUDA runtime in trojanguard._C cannot run: {ext.cuda_probe()}")
    return reasons


# ---------------------------------------------------------------- launching a kernel
def launch(op: str, device: torch.device, args: dict) -> None:
    """Run the extension's kernel for ``op`` on ``device``; ``args`` holds the kernel's data pointers, sizes,
    dtype codes (:data:`DTYPE_CODES`) and scalars. Every op's bindings follow one convention:
    ``<op>_cpu(args, num_threads)`` on CPU; ``<op>_cuda_workspace_bytes(args, device)`` and
    ``<op>_cuda(args, device, stream, workspace)`` on CUDA, run on torch's current stream with a scratch
    buffer that torch allocates. The caller has checked the op's reasons (the extension is there)."""
    module = extension().module
    if device.type == "cpu":
        getattr(module, f"{op}_cpu")(args, torch.get_num_threads())
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    workspace_bytes = getattr(module, f"{op}_cuda_workspace_bytes")(args, index)
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device) if workspace_bytes else None
    stream = torch.cuda.current_stream(device).cuda_stream
    getattr(module, f"{op}_cuda")(args, index, stream, 0 if workspace is None else workspace.data_ptr())
