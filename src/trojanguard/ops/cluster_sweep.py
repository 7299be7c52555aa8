"""The cluster-masking sweep's three memory-bound steps as ops (issue 22), each beside its pure-PyTorch reference
(the oracle of :mod:`trojanguard.ops.cluster_mask`), dispatched like ``mask_step``:

* :func:`occlude` — ``(N, C, H, W)`` images, ``(W, 4)`` boxes, ``(N, C)`` fill values → ``(N·W, C, H, W)``
  masked copies, built where the images are (never on the host for device images);
* :func:`cluster_drop` — ``(N·W, D)`` features of the copies, ``(N, D)`` own centroids, ``(N,)`` unmasked
  similarities → ``(N, W)`` drops ``base − cos(f, c)``: one fused reduction per row, no ``(N·W, K)`` matrix;
* :func:`occlusion_heat` — ``(N, W)`` drops, ``(W, 4)`` boxes → ``(N, H, W)`` heat maps, each pixel the mean drop
  of the windows covering it (0 where none does).

Backends: the references here, Triton (``trojanguard._kernels.cluster_sweep``; on CPU only under
``TRITON_INTERPRET=1``), C++ CPU and CUDA (``trojanguard._C``). Boxes are ``(top, left, height, width)`` int64 and
may reach outside the image (clipped). :func:`sweep_drops` and :func:`sweep_heatmaps` chain the ops around an
encoder's forward passes, in chunks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io

import torch

from trojanguard import _native
from trojanguard.ops._backends import define_op, triton_reasons
from trojanguard.ops.cluster_mask import box_masks, fill_values, masked_copies, own_similarity, scatter_mean

BACKEND_PRIORITY = ("cuda", "triton", "cpp", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- references
def occlude_reference(x: torch.Tensor, windows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(N·W, C, H, W)``: row ``i·W + n`` is image ``i`` with box ``n`` set to ``values[i]`` (in x's dtype)."""
    n, c = x.shape[:2]
    return masked_copies(x, box_masks(windows.cpu(), *x.shape[2:]), values.reshape(n, c, 1, 1).to(x.dtype))


def cluster_drop_reference(features: torch.Tensor, centroids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``(N, W)`` float32: ``base[i] − cos(features[i·W + n], centroids[i])``."""
    n = len(centroids)
    windows = len(features) // n
    similarity = own_similarity(features.float(), centroids.float().repeat_interleave(windows, 0))
    return base.float()[:, None] - similarity.view(n, windows)


def occlusion_heat_reference(drops: torch.Tensor, windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, H, W)`` float32: per pixel the mean of ``drops`` over the boxes covering it (0 where none does)."""
    return scatter_mean(drops.float(), box_masks(windows.cpu(), height, width).to(drops.device))


# ---------------------------------------------------------------- input checks shared by the fast backends
def _same_device(*tensors: torch.Tensor) -> list[str]:
    return [] if len({t.device for t in tensors}) == 1 else ["tensors are on different devices"]


def _box_reasons(windows: torch.Tensor) -> list[str]:
    if windows.dim() != 2 or windows.shape[1] != 4 or windows.dtype != torch.int64:
        return [f"windows must be (W, 4) int64 boxes, got {windows.dtype} {tuple(windows.shape)}"]
    return [] if len(windows) else ["windows is empty"]


def occlude_input_reasons(x, windows, values) -> list[str]:
    reasons = _same_device(x, windows, values)
    if x.dtype not in FLOAT_DTYPES:
        reasons.append(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != 4 or x.numel() == 0:
        return [*reasons, f"x must be a non-empty (N, C, H, W), got {tuple(x.shape)}"]
    if values.numel() != x.shape[0] * x.shape[1]:
        reasons.append(f"values must hold N·C = {x.shape[0] * x.shape[1]} fill values, got {values.numel()}")
    return reasons + _box_reasons(windows)


def cluster_drop_input_reasons(features, centroids, base) -> list[str]:
    reasons = _same_device(features, centroids, base)
    if features.dtype not in FLOAT_DTYPES:
        reasons.append(f"features must be float32, bfloat16 or float16, got {features.dtype}")
    if features.dim() != 2 or centroids.dim() != 2 or len(centroids) == 0:
        return [*reasons, f"features and centroids must be 2-d, got {tuple(features.shape)} and {tuple(centroids.shape)}"]
    if features.shape[1] != centroids.shape[1] or len(features) % len(centroids) or len(features) == 0:
        reasons.append(f"features must be (N·W, D) for centroids (N, D) = {tuple(centroids.shape)}, got "
                       f"{tuple(features.shape)}")
    if base.numel() != len(centroids):
        reasons.append(f"base must hold N = {len(centroids)} similarities, got {base.numel()}")
    return reasons


def occlusion_heat_input_reasons(drops, windows, height, width) -> list[str]:
    reasons = _same_device(drops, windows)
    if drops.dim() != 2 or drops.shape[1] != len(windows) or drops.numel() == 0:
        reasons.append(f"drops must be (N, W) for {len(windows)} windows, got {tuple(drops.shape)}")
    if height < 1 or width < 1:
        reasons.append(f"height and width must be positive, got {height} × {width}")
    return reasons + _box_reasons(windows)


# ---------------------------------------------------------------- Triton
def _triton_machine_reasons() -> list[str]:
    if importlib.util.find_spec("trojanguard._kernels.cluster_sweep") is None:
        return ["trojanguard._kernels.cluster_sweep is not installed"]
    return []


def _occlude_triton(x, windows, values):
    from trojanguard._kernels.cluster_sweep import occlude_triton

    # the fill values rounded to x's dtype by torch (round to nearest even) before the kernel: the interpreter's
    # in-kernel down-cast truncates
    return occlude_triton(x.contiguous(), windows.contiguous(), values.reshape(x.shape[:2]).to(x.dtype).contiguous())


def _cluster_drop_triton(features, centroids, base):
    from trojanguard._kernels.cluster_sweep import cluster_drop_triton

    return cluster_drop_triton(features.contiguous(), centroids.float().contiguous(), base.reshape(-1).float().contiguous())


def _occlusion_heat_triton(drops, windows, height, width):
    from trojanguard._kernels.cluster_sweep import occlusion_heat_triton

    return occlusion_heat_triton(drops.float().contiguous(), windows.contiguous(), height, width)


# ---------------------------------------------------------------- C++ CPU and CUDA (trojanguard._C)
def _native_machine_reasons(op: str, device_type: str) -> list[str]:
    module = _native.extension().module
    if device_type == "cuda" and (module is None or not module.build_info()["cuda"]):
        return []  # the backend's own reasons say why (no CUDA in the build)
    if module is not None and not hasattr(module, f"{op}_{device_type}"):
        return [f"trojanguard._C has no {op}_{device_type} (an older build)"]
    return []


def _native_reasons(op: str, device_type: str, input_reasons, tensors, *args) -> list[str]:
    machine = _native.cpu_reasons() if device_type == "cpu" else _native.cuda_reasons()
    reasons = machine + (_native_machine_reasons(op, device_type) if not machine else [])
    if any(t.device.type != device_type for t in tensors):
        reasons.append(f"tensors are not on the {device_type.upper() if device_type == 'cpu' else 'CUDA'} device")
    return reasons + input_reasons(*args)


def _occlude_native(x, windows, values):
    n, c, h, w = x.shape
    x_c, windows_c = x.contiguous(), windows.contiguous()
    values_c = values.reshape(n, c).float().contiguous()
    out = torch.empty((n * len(windows), c, h, w), dtype=x.dtype, device=x.device)
    _native.launch("occlude", x.device, {
        "x": x_c.data_ptr(), "windows": windows_c.data_ptr(), "values": values_c.data_ptr(), "out": out.data_ptr(),
        "x_dtype": _native.DTYPE_CODES[x.dtype], "batch": n, "channels": c, "height": h, "width": w,
        "windows_count": len(windows)})
    return out


def _cluster_drop_native(features, centroids, base):
    n, d = centroids.shape
    f_c, c_c = features.contiguous(), centroids.float().contiguous()
    b_c = base.reshape(n).float().contiguous()
    out = torch.empty((n, len(features) // n), dtype=torch.float32, device=features.device)
    _native.launch("cluster_drop", features.device, {
        "features": f_c.data_ptr(), "centroids": c_c.data_ptr(), "base": b_c.data_ptr(), "out": out.data_ptr(),
        "features_dtype": _native.DTYPE_CODES[features.dtype], "batch": n, "windows_count": out.shape[1], "dim": d})
    return out


def _occlusion_heat_native(drops, windows, height, width):
    d_c, windows_c = drops.float().contiguous(), windows.contiguous()
    out = torch.empty((len(drops), height, width), dtype=torch.float32, device=drops.device)
    _native.launch("occlusion_heat", drops.device, {
        "drops": d_c.data_ptr(), "windows": windows_c.data_ptr(), "out": out.data_ptr(), "batch": len(drops),
        "windows_count": len(windows), "height": height, "width": width})
    return out


# ---------------------------------------------------------------- the ops
# occlude: Triton before CUDA — measured on an H100 (RESULTS.md, issue 22): the Triton kernel writes at 87–94 % of
# the copy bandwidth in float32, the CUDA kernel (one thread per pixel, 64-bit index division) at 15 %, slower than
# the reference. The other two ops keep CUDA first (cluster_drop: on par; occlusion_heat: CUDA 2–3× Triton).
OCCLUDE_PRIORITY = ("triton", "cuda", "cpp", "reference")
occlude_op = define_op("occlude", occlude_reference, priority=OCCLUDE_PRIORITY)
cluster_drop_op = define_op("cluster_drop", cluster_drop_reference, priority=BACKEND_PRIORITY)
occlusion_heat_op = define_op("occlusion_heat", occlusion_heat_reference, priority=BACKEND_PRIORITY)

for _op, _triton, _native_fn, _inputs, _count in (
        (occlude_op, _occlude_triton, _occlude_native, occlude_input_reasons, 3),
        (cluster_drop_op, _cluster_drop_triton, _cluster_drop_native, cluster_drop_input_reasons, 3),
        (occlusion_heat_op, _occlusion_heat_triton, _occlusion_heat_native, occlusion_heat_input_reasons, 2)):
    _op.register("triton", _triton,
                 lambda *a, _i=_inputs, _n=_count: _triton_machine_reasons() or (triton_reasons(*a[:_n]) + _i(*a)),
                 _triton_machine_reasons)
    for _device in ("cpu", "cuda"):
        _op.register("cpp" if _device == "cpu" else "cuda", _native_fn,
                     lambda *a, _name=_op.name, _d=_device, _i=_inputs, _n=_count: _native_reasons(_name, _d, _i, a[:_n], *a),
                     lambda _name=_op.name, _d=_device: _native_machine_reasons(_name, _d))


def occlude(x: torch.Tensor, windows: torch.Tensor, values: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Masked copies of every image with every box filled (module docstring)."""
    return occlude_op(x, windows, values, backend=backend)


def cluster_drop(features: torch.Tensor, centroids: torch.Tensor, base: torch.Tensor, *,
                 backend: str | None = None) -> torch.Tensor:
    """``(N, W)`` drops of the own-centroid cosine similarity (module docstring)."""
    return cluster_drop_op(features, centroids, base, backend=backend)


def occlusion_heat(drops: torch.Tensor, windows: torch.Tensor, height: int, width: int, *,
                   backend: str | None = None) -> torch.Tensor:
    """``(N, H, W)`` heat maps: per pixel the mean drop of the windows covering it (module docstring)."""
    return occlusion_heat_op(drops, windows, height, width, backend=backend)


# ---------------------------------------------------------------- the sweep around an encoder
@torch.no_grad()
def sweep_drops(encoder, x: torch.Tensor, centroids: torch.Tensor, windows: torch.Tensor, *,
                fill: float | str = "mean", batch_size: int = 4096, backend: str | None = None) -> torch.Tensor:
    """``(N, W)`` drops ``a(x) − a(x with window n filled)`` of every image and box (as
    :func:`~trojanguard.ops.cluster_mask.window_drops_reference`), the masked copies built, reduced and never
    held beyond one chunk of ``max(1, batch_size // W)`` images."""
    windows = windows.to(x.device)
    per_chunk = max(1, batch_size // len(windows))
    drops = []
    for start in range(0, len(x), per_chunk):
        xs, cs = x[start : start + per_chunk], centroids[start : start + per_chunk]
        base = own_similarity(encoder(xs), cs)
        copies = occlude(xs, windows, fill_values(xs, fill).reshape(len(xs), -1), backend=backend)
        drops.append(cluster_drop(encoder(copies), cs, base, backend=backend))
    return torch.cat(drops)


def sweep_heatmaps(encoder, x: torch.Tensor, centroids: torch.Tensor, windows: torch.Tensor, *,
                   fill: float | str = "mean", batch_size: int = 4096, backend: str | None = None) -> torch.Tensor:
    """``(N, H, W)`` heat maps of the sweep over ``windows`` (as
    :func:`~trojanguard.ops.cluster_mask.cluster_mask_sweep_reference`)."""
    drops = sweep_drops(encoder, x, centroids, windows, fill=fill, batch_size=batch_size, backend=backend)
    return occlusion_heat(drops, windows.to(drops.device), *x.shape[2:], backend=backend)


# ---------------------------------------------------------------- the encoder the sweep runs
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a CUDA GPU that supports it; a CPU with AVX-512 BF16 or
    AMX, read from /proc/cpuinfo), where running the sweep's forward passes in bf16 saves time."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_ACTIVATION_BUDGET = 4 << 20  # bytes of one layer's output per CPU forward: throughput peaks when it stays in cache
MAX_FORWARD_BATCH = 256
MAX_GRAPHS = 4  # CUDA graphs one SweepEncoder keeps (one per pass shape)


@contextlib.contextmanager
def full_float32():
    """float32 convolutions and matrix products in full precision (no TF32 on a GPU) for the duration: a check of a
    preparation must not fail on TF32's rounding (~1e-3 relative)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class SweepEncoder:
    """A forward-only encoder for the sweep's many masked copies: an eval-mode copy with no weight gradients,
    convolution–batch-norm pairs folded (``torch.fx``'s ``fuse``, where the module traces), channels-last memory,
    autocast to bfloat16 where the device has it natively (``low_precision="auto"``; True / False force it; bf16
    blurs heat maps whose windows are a small part of the image — correlation 0.88 with float32's at 224 px with
    16-px windows on an H100, RESULTS.md — so PoisonCAM passes False), and forward passes of ``forward_batch``
    images (``"auto"``: on a GPU the whole chunk; on a CPU the power of two that keeps the largest layer output of
    one pass within :data:`CPU_ACTIVATION_BUDGET`, measured on one image per input shape — a small CNN at 32 px gets
    32, a ResNet-18 16: 3–5× the throughput of 4096-image passes, RESULTS.md) and, on a GPU, CUDA graphs
    (``cuda_graphs="auto"``): a pass shape seen a second time (the sweep's chunks all have one shape but the last)
    is captured once and replayed, one launch instead of one per layer (on an H100 with 4 096-image passes: no
    measurable gain). Calls return float32 features. Each preparation is checked against the encoder on the first
    batch of each input shape, falling back (no folding, then no channels-last, then the encoder as given) where it
    does not give the encoder's features — a traced graph that skips a shape-dependent step, a ``view`` that
    channels-last breaks."""

    def __init__(self, encoder, device: torch.device | str = "cpu", *, fold_batchnorm: bool = True,
                 channels_last: bool = True, low_precision: bool | str = "auto", forward_batch: int | str = "auto",
                 cuda_graphs: bool | str = "auto"):
        self.device = torch.device(device)
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: CUDA graphs need a CUDA device, got {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs == "auto" else bool(cuda_graphs)
        self._graphs: dict[tuple, tuple] = {}  # pass shape -> (graph, static input, static output)
        self._passes_seen: set[tuple] = set()
        self.encoder = encoder
        self.forward_batch = forward_batch if forward_batch == "auto" else int(forward_batch)
        self._batch_for: dict[tuple[int, ...], int] = {}  # "auto" on a CPU: images per pass, per input shape
        self._verified: set[tuple[int, ...]] = set()  # input shapes on which the prepared model matched the encoder
        # what to try, best first: the first that builds and matches the encoder on the first batch of a shape is run
        self._plans = [(f, c) for f, c in ((fold_batchnorm, channels_last), (False, channels_last), (False, False))]
        self._plans = list(dict.fromkeys(self._plans))
        self.low_precision = native_bf16(self.device) if low_precision == "auto" else bool(low_precision)
        self._use_next_plan()

    def _use_next_plan(self) -> None:
        """Build the next plan's model (a copy of the encoder; the encoder itself when none is left)."""
        import copy

        from trojanguard.models.adapters import Encoder

        self.model, self.channels_last, self.steps = self.encoder, False, ["as given"]
        self.skipped: list[str] = getattr(self, "skipped", [])  # plans that could not be built, and why
        while self._plans:
            fold, channels_last = self._plans.pop(0)
            try:
                model = copy.deepcopy(self.encoder).eval().requires_grad_(False)
                steps = []
                if fold:
                    from torch.fx.experimental.optimization import fuse

                    if isinstance(model, Encoder):  # fold the user's module; the wrapper's pooling stays eager
                        if model.layer is not None:
                            raise ValueError("a named layer's hook needs the module's own structure")
                        model.module = fuse(model.module)
                    else:
                        model = fuse(model)
                    steps.append("conv-bn folded")
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                    steps.append("channels_last")
            except Exception as exc:  # noqa: BLE001 — cannot be copied or traced (TorchScript, control flow)
                self.skipped.append(f"fold={fold}, channels_last={channels_last}: {type(exc).__name__}")
            else:
                self.model, self.channels_last, self.steps = model, channels_last, steps
                break
        if self.low_precision:
            self.steps.append("bf16 autocast")
        if self.cuda_graphs:
            self.steps.append("CUDA graphs")
        self._graphs.clear()  # captured from the previous plan's model

    def _check_on(self, x: torch.Tensor) -> None:
        """On the first batch of each input shape: the prepared model must give the encoder's features (shape, and
        values within 1e-3 in float32: folding reorders the arithmetic); otherwise fall back to the next plan."""
        shape = tuple(x.shape[1:])
        while shape not in self._verified and self.model is not self.encoder:
            sample = x[:2]
            modes = {m: m.training for m in self.encoder.modules()} if isinstance(self.encoder, torch.nn.Module) else {}
            try:  # a traced module prints its own traceback before raising: kept off the user's stderr
                with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()), full_float32():
                    if modes:
                        self.encoder.eval()  # the user's encoder, compared in eval mode and restored after
                    expected = self.encoder(sample).float()
                    got = self.model(sample.contiguous(memory_format=torch.channels_last) if self.channels_last
                                     and sample.dim() == 4 else sample).float()
                same = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-3, rtol=1e-3)
            except Exception:  # noqa: BLE001 — e.g. a view() that channels-last memory breaks
                same = False
            finally:
                for module, training in modes.items():
                    module.training = training
            if same:
                self._verified.add(shape)
            else:
                self._use_next_plan()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            with torch.inference_mode():
                return self.encoder(x).float()
        self._check_on(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            step = self._images_per_pass(x) or len(x)
            return torch.cat([self._pass(x[s : s + step]) for s in range(0, len(x), step)])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # no autocast weight cache: a captured graph must not hold casts made outside it
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low_precision, cache_enabled=False):
            return self.model(x).float()

    def _pass(self, x: torch.Tensor) -> torch.Tensor:
        """One forward pass: replayed from a CUDA graph where one is captured for its shape, else eager."""
        if not self.cuda_graphs or x.device.type != "cuda":
            return self._forward(x)
        key = (tuple(x.shape), x.dtype, x.stride())
        if key not in self._graphs:
            if key not in self._passes_seen or len(self._graphs) >= MAX_GRAPHS:  # a shape seen once (the last
                self._passes_seen.add(key)  # chunk, a check) is not worth a capture; each graph holds its memory
                return self._forward(x)
            self._capture(key, x)
            if key not in self._graphs:
                return self._forward(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, key: tuple, x: torch.Tensor) -> None:
        """Capture the model's pass on ``x``'s shape; keep it only where a replay gives the eager features (else
        CUDA graphs are turned off, the reason in ``skipped``)."""
        static_in = x.clone()
        try:
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up off the main stream (cuDNN plans, allocator), as capture needs
                for _ in range(2):
                    expected = self._forward(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_in)
            graph.replay()
            if not torch.allclose(static_out, expected, atol=1e-3, rtol=1e-3):
                raise RuntimeError("the replayed graph's features differ from the eager pass")
        except Exception as exc:  # noqa: BLE001 — a model that cannot be captured (host syncs, dynamic shapes)
            self.cuda_graphs = False
            self.steps = [s for s in self.steps if s != "CUDA graphs"]
            self.skipped.append(f"CUDA graphs: {type(exc).__name__}: {exc}")
            return
        self._graphs[key] = (graph, static_in, static_out)

    def _images_per_pass(self, x: torch.Tensor) -> int:
        """``forward_batch``, or for "auto" (0 = all at once on a GPU) the CPU rule of the class docstring."""
        if self.forward_batch != "auto":
            return self.forward_batch
        if x.device.type != "cpu":
            return 0
        shape = tuple(x.shape[1:])
        if shape not in self._batch_for:
            largest = [0]

            def hook(_module, _inputs, output):
                if isinstance(output, torch.Tensor):
                    largest[0] = max(largest[0], output.numel() * output.element_size())

            modules = list(self.model.modules()) if isinstance(self.model, torch.nn.Module) else []
            handles = [m.register_forward_hook(hook) for m in modules if not list(m.children())]
            try:
                self.model(x[:1])
            finally:
                for handle in handles:
                    handle.remove()
            fits = CPU_ACTIVATION_BUDGET // max(largest[0], 1)
            self._batch_for[shape] = min(MAX_FORWARD_BATCH, 1 << max(0, fits.bit_length() - 1)) if largest[0] else 0
        return self._batch_for[shape]
