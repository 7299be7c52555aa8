"""The native extension ``trojanguard._C`` (C++ CPU ops; CUDA ops where built) and the ops that call it.

Loading, on first use: the installed ``trojanguard._C`` if it is importable and current; otherwise (e.g.
running from the source tree with ``PYTHONPATH=src``) the same sources in ``csrc/`` are compiled just in time
with g++ (and nvcc for the CUDA part where a CUDA device is present) into ``$TROJANGUARD_CACHE/ext``
(default ``~/.cache/trojanguard/ext``), keyed by a hash of the sources, compilers, flags and Python.
``TROJANGUARD_NO_JIT=1`` turns the just-in-time build off. When there is no extension, ONE warning says why,
:func:`cpu_reasons` / :func:`cuda_reasons` keep the reasons, and every op falls back to its reference.

The extension does not link libtorch: its functions take raw data pointers, sizes, dtype codes and scalars.
This module validates devices, dtypes and shapes, makes contiguous copies where needed, allocates outputs
with torch and registers the op ``torch.ops.trojanguard.mask_step`` (a custom op with a fake implementation,
so torch.compile can trace it) whose CPU kernel is the C++ one and whose CUDA kernel is the CUDA one.
"""

import contextlib
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

API_VERSION = 1  # must equal kApiVersion in csrc/bindings.cpp
NO_JIT_ENV = "TROJANGUARD_NO_JIT"
CACHE_ENV = "TROJANGUARD_CACHE"
CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source tree, not in an installed wheel
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # DType in csrc/mask_step_math.h


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
    with _file_lock(target_dir / "build.lock"):
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


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive lock between processes (released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking; builds go through a temporary file and an atomic rename
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def _mask_step_input_reasons(device_type: str, theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params=None,
                             mean=None, std=None, out_dtype=None) -> list[str]:
    """What about these inputs the native kernels cannot take (shapes the reference would reject included)."""
    tensors = {"theta": theta, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "x": x, "delta": delta,
               "grad_xadv": grad_xadv, "seeds": seeds, "mean": mean, "std": std}
    given = {name: t for name, t in tensors.items() if t is not None}
    if not all(isinstance(t, torch.Tensor) for t in given.values()):
        return ["inputs must be tensors"]
    reasons = []
    off_device = [name for name, t in given.items() if t.device.type != device_type]
    if off_device:
        reasons.append(f"tensors are not on {device_type.upper()} ({', '.join(off_device)})")
    elif device_type == "cuda" and len({t.device for t in given.values()}) > 1:
        reasons.append("tensors are on different CUDA devices")
    wrong = [f"{n} is {t.dtype}" for n, t in (("theta", theta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
             if t.dtype != torch.float32]
    if wrong:
        reasons.append(f"theta and the Adam moments must be float32 ({', '.join(wrong)})")
    for name, dtype in (("x", x.dtype), ("grad_xadv", grad_xadv.dtype), ("out_dtype", out_dtype or x.dtype)):
        if dtype not in DTYPE_CODES:
            reasons.append(f"{name} must be float32, bfloat16 or float16, got {dtype}")
    if seeds.dtype.is_complex or seeds.dtype == torch.bool:
        reasons.append(f"seeds must be integers, got {seeds.dtype}")
    if x.dim() != 4 or theta.dim() != 4:
        return [*reasons, f"x and theta must be 4-d (N, C, H, W), got {tuple(x.shape)} and {tuple(theta.shape)}"]
    n, c, h, w = x.shape
    if theta.shape[1] not in (1, c) or (theta.shape[0], *theta.shape[2:]) != (n, h, w):
        reasons.append(f"theta must be (N, 1 or C, H, W) for x {tuple(x.shape)}, got {tuple(theta.shape)}")
    if exp_avg.shape != theta.shape or exp_avg_sq.shape != theta.shape:
        reasons.append("exp_avg and exp_avg_sq must have theta's shape")
    if grad_xadv.shape != x.shape:
        reasons.append(f"grad_xadv must have x's shape {tuple(x.shape)}, got {tuple(grad_xadv.shape)}")
    if delta.numel() != n * c or seeds.numel() != n:
        reasons.append(f"delta must hold N·C = {n * c} values and seeds N = {n}")
    if any(t is not None and t.numel() != c for t in (mean, std)):
        reasons.append(f"mean and std must hold C = {c} values")
    if mean is not None and std is None:
        reasons.append("mean is given without std")
    if x.numel() == 0:
        reasons.append("x is empty")
    return reasons


def mask_step_cpp_reasons(*args, **kwargs) -> list[str]:
    """Why the C++ kernel cannot run these :func:`~trojanguard.ops.mask_step` arguments (empty: it can)."""
    return cpu_reasons() + _mask_step_input_reasons("cpu", *args, **kwargs)


def mask_step_cuda_reasons(*args, **kwargs) -> list[str]:
    """Why the CUDA kernel cannot run these :func:`~trojanguard.ops.mask_step` arguments (empty: it can)."""
    reasons = cuda_reasons() + _mask_step_input_reasons("cuda", *args, **kwargs)
    module = extension().module
    x = args[3] if len(args) > 3 else kwargs.get("x")
    limits = module is not None and hasattr(module, "CUDA_MAX_WIDTH") and isinstance(x, torch.Tensor) and x.dim() == 4
    if limits and (x.shape[-1] > module.CUDA_MAX_WIDTH or x.shape[1] > module.CUDA_MAX_CHANNELS):
        reasons.append(f"the CUDA kernel takes width <= {module.CUDA_MAX_WIDTH} and channels <= "
                           f"{module.CUDA_MAX_CHANNELS}, got {x.shape[-1]} and {x.shape[1]}")
    return reasons


# ---------------------------------------------------------------- the op
def mask_step_cpp(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
                  out_dtype=None):
    """:func:`~trojanguard.ops.mask_step_reference` on the C++ CPU kernel (same arguments and results)."""
    return _call_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype)


def mask_step_cuda(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean=None, std=None,
                   out_dtype=None):
    """:func:`~trojanguard.ops.mask_step_reference` on the CUDA kernel (same arguments and results)."""
    return _call_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype)


def _call_op(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, params, mean, std, out_dtype):
    return torch.ops.trojanguard.mask_step(
        theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, float(params.lr), float(params.beta1),
        float(params.beta2), float(params.eps), float(params.l1_weight), float(params.tv_weight), int(params.step),
        out_dtype or x.dtype)


@torch.library.custom_op("trojanguard::mask_step", mutates_args=("theta", "exp_avg", "exp_avg_sq"),
                         device_types="cpu")
def _mask_step_op(theta: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                  delta: torch.Tensor, grad_xadv: torch.Tensor, seeds: torch.Tensor, mean: torch.Tensor | None,
                  std: torch.Tensor | None, lr: float, beta1: float, beta2: float, eps: float, l1_weight: float,
                  tv_weight: float, step: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused mask step (see trojanguard.ops.mask_step_reference): updates θ and the Adam moments in place,
    returns (delta_next (N, C, 1, 1) float32, x_adv_next (N, C, H, W) out_dtype)."""
    return _run_kernel("cpu", theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2,
                       eps, l1_weight, tv_weight, step, out_dtype)


@_mask_step_op.register_kernel("cuda")
def _mask_step_op_cuda(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2, eps,
                       l1_weight, tv_weight, step, out_dtype):
    return _run_kernel("cuda", theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2,
                       eps, l1_weight, tv_weight, step, out_dtype)


@_mask_step_op.register_fake
def _mask_step_op_fake(theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2, eps,
                       l1_weight, tv_weight, step, out_dtype):
    n, c = x.shape[:2]
    return x.new_empty((n, c, 1, 1), dtype=torch.float32), torch.empty_like(
        x, dtype=out_dtype, memory_format=torch.contiguous_format)


def _run_kernel(device_type, theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, mean, std, lr, beta1, beta2,
                eps, l1_weight, tv_weight, step, out_dtype):
    reasons = (mask_step_cpp_reasons if device_type == "cpu" else mask_step_cuda_reasons)(
        theta, exp_avg, exp_avg_sq, x, delta, grad_xadv, seeds, None, mean, std, out_dtype)
    if reasons:
        raise RuntimeError(f"trojanguard::mask_step ({device_type}): " + "; ".join(reasons))
    from trojanguard.ops.mask_step import MaskStepParams  # not at import: ops.mask_step imports this module

    module = extension().module
    params = MaskStepParams(lr, beta1, beta2, eps, l1_weight, tv_weight, step)
    n, c, h, w = x.shape
    state = (theta, exp_avg, exp_avg_sq)
    work = [t if t.is_contiguous() else t.contiguous() for t in state]
    x_c, grad_c = x.contiguous(), grad_xadv.contiguous()
    delta_c = delta.reshape(n, c).to(torch.float32).contiguous()
    seeds_c = seeds.reshape(n).to(torch.int64).contiguous()
    mean_c = None if mean is None else mean.reshape(c).to(torch.float32).contiguous()
    std_c = None if std is None else std.reshape(c).to(torch.float32).contiguous()
    delta_next = torch.empty((n, c, 1, 1), dtype=torch.float32, device=x.device)
    x_adv = torch.empty((n, c, h, w), dtype=out_dtype, device=x.device)
    args = {
        "theta": work[0].data_ptr(), "exp_avg": work[1].data_ptr(), "exp_avg_sq": work[2].data_ptr(),
        "x": x_c.data_ptr(), "delta": delta_c.data_ptr(), "grad": grad_c.data_ptr(), "seeds": seeds_c.data_ptr(),
        "mean": 0 if mean_c is None else mean_c.data_ptr(), "std": 0 if std_c is None else std_c.data_ptr(),
        "delta_next": delta_next.data_ptr(), "out": x_adv.data_ptr(),
        "x_dtype": DTYPE_CODES[x.dtype], "grad_dtype": DTYPE_CODES[grad_xadv.dtype],
        "out_dtype": DTYPE_CODES[out_dtype],
        "batch": n, "channels": c, "mask_channels": theta.shape[1], "height": h, "width": w,
        "beta1": beta1, "beta2": beta2, "eps": eps, "l1_weight": l1_weight, "tv_weight": tv_weight,
        "step_size": params.step_size, "bias_correction2_sqrt": params.bias_correction2_sqrt,
        "next_step": step + 1,
    }
    if device_type == "cpu":
        module.mask_step_cpu(args, torch.get_num_threads())
    else:
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        workspace_bytes = module.mask_step_cuda_workspace_bytes(args, device)
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=x.device) if workspace_bytes else None
        stream = torch.cuda.current_stream(x.device).cuda_stream
        module.mask_step_cuda(args, device, stream, 0 if workspace is None else workspace.data_ptr())
    for original, updated in zip(state, work, strict=True):
        if updated is not original:
            original.copy_(updated)
    return delta_next, x_adv
