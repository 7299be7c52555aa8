"""Fused mask step against the GPU's memory-bandwidth roofline (CUDA only).

The step is memory-bound: per pixel it does ~60 flops on ~(4·3 + 2·C + C + ...) fp32 values. Its floor is the
fewest bytes it must move: read θ, both Adam moments, x and the input gradient once; write θ, the moments and
the next x_adv once. The ceiling is the device-to-device copy bandwidth measured here (bytes read + written).

``--cluster``: the cluster-masking sweep's ops instead (issue 22: ``occlude``, ``cluster_drop``, ``occlusion_heat``
at the sizes of ``test_bench_cluster_sweep.py``), each floor the bytes its inputs and output take once.

Run: ``PYTHONPATH=src python benchmarks/roofline.py [--cluster]`` on a machine with CUDA. Each backend is timed twice with
CUDA events, as the median over many repeats, rotating over enough input sets that they do not fit in L2 (a
32×32 batch is a few MB and would otherwise be served from cache): *eager* (one Python call per step, host
dispatch included: what a loop without CUDA graphs pays) and *graph* (the same calls captured in one CUDA graph
and replayed: the kernels' own time, what the detector's graphed loop pays). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from trojanguard.ops import OPS, MaskStepParams, mask_step, uniform_noise

SHAPES = {"256x3x32x32": (256, 3, 32, 32), "64x3x224x224": (64, 3, 224, 224), "1024x3x32x32": (1024, 3, 32, 32)}
PARAMS = MaskStepParams(lr=0.1, beta1=0.1, beta2=0.1, eps=1e-8, l1_weight=0.01, tv_weight=1.0, step=5)
ROTATION_BYTES = 4 * 2**30 // 8  # total size of the rotated input sets: far beyond any L2


def median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` CUDA-event timings of ``fn(i)`` (after a warm-up)."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, calls: int, repeats: int) -> float:
    """Per-call time of ``fn(0) … fn(calls − 1)`` captured in one CUDA graph, median over replays."""
    for i in range(calls):  # warm-up (compilation, allocator) on the capture's side stream
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    return median_ms(lambda i: graph.replay(), repeats) / calls


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.rand(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src), 20)
    return 2 * nbytes / ms / 1e6


def input_set(n: int, c: int, h: int, w: int, mask_channels: int, dtype: torch.dtype, generator: torch.Generator):
    theta = torch.randn(n, mask_channels, h, w, device="cuda", generator=generator)
    seeds = torch.arange(n, device="cuda")
    x = torch.rand(n, c, h, w, device="cuda", generator=generator).to(dtype)
    grad = (torch.randn(n, c, h, w, device="cuda", generator=generator) * 1e-2).to(dtype)
    return [theta, torch.rand_like(theta) * 1e-3, torch.rand_like(theta) * 1e-6, x, uniform_noise(seeds, 5, c), grad,
            seeds]


def minimal_bytes(tensors) -> int:
    theta, exp_avg, exp_avg_sq, x, _, grad, _ = tensors
    state = sum(t.numel() * t.element_size() for t in (theta, exp_avg, exp_avg_sq))
    return 2 * state + x.numel() * x.element_size() * 2 + grad.numel() * grad.element_size()  # + x_adv written


def sweep_triton(name, dtype_name, sets, mean, std, moved, peak, repeats) -> list[str]:
    """Graph-timed Triton kernel at every block size × num_warps (the automatic choice is marked)."""
    from trojanguard._kernels.mask_step import mask_step_triton

    rows = []
    for block in (256, 512, 1024, 2048, 4096):
        for warps in (2, 4, 8, 16):
            def run(i, block=block, warps=warps):
                mask_step_triton(*sets[i % len(sets)], PARAMS, mean, std, block_size=block, num_warps=warps)

            try:
                ms = graph_ms(run, len(sets), repeats)
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result too
                rows.append(f"| {name} | {dtype_name} | triton BLOCK={block} warps={warps} | – | failed: "
                            f"{type(exc).__name__} | – | – | – |")
                continue
            gbs = moved / ms / 1e6
            rows.append(f"| {name} | {dtype_name} | triton BLOCK={block} warps={warps} | – | {ms * 1e3:.1f} | "
                        f"{gbs:.0f} | {100 * gbs / peak:.0f} % | – |")
            print(rows[-1], flush=True)
    return rows


def cluster_rows(peak: float, dtypes: list[str], backends: list[str], repeats: int) -> list[str]:
    """The sweep's three ops per size × dtype × backend: the kernels graph-timed (the references eager), GB/s over
    their minimal bytes (every input read once, the output written once), against the copy bandwidth and the
    reference."""
    from test_bench_cluster_sweep import RUN, SIZES, inputs

    def nbytes(args) -> int:
        return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))

    rows = []
    for size in SIZES:
        for op, run_op in RUN.items():
            for dtype_name in dtypes if op != "occlusion_heat" else ["float32"]:  # its drops are float32 always
                dtype = getattr(torch, dtype_name)

                def on_device(args, dtype=dtype):
                    return [a.to("cuda", dtype if i == 0 and a.is_floating_point() else a.dtype)
                            if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]

                first = on_device(inputs(size)[op])
                out = run_op(*first, backend="reference")
                moved = nbytes(first) + out.numel() * out.element_size()
                sets = [first] + [on_device(inputs(size)[op]) for _ in range(max(1, min(8, ROTATION_BYTES // moved)) - 1)]
                del out
                reasons = OPS[op].reasons(*first)
                reference_ms = None
                for backend in backends:
                    if reasons[backend]:
                        rows.append(f"| {size} | {op} | {dtype_name} | {backend} | – | – | – | {'; '.join(reasons[backend])} |")
                        continue

                    def run(i, backend=backend, sets=sets, run_op=run_op):
                        run_op(*sets[i % len(sets)], backend=backend)

                    # the references copy the boxes to the host (box_masks), which a graph cannot capture: eager
                    timing = "eager" if backend == "reference" else "graph"
                    ms = median_ms(run, repeats) if timing == "eager" else graph_ms(run, len(sets), repeats)
                    reference_ms = ms if backend == "reference" else reference_ms
                    gbs = moved / ms / 1e6
                    rows.append(f"| {size} | {op} | {dtype_name} | {backend} | {timing} {ms * 1e3:.1f} | {gbs:.0f} | "
                                f"{100 * gbs / peak:.0f} % | {f'{reference_ms / ms:.1f}×' if reference_ms else '–'} |")
                    print(rows[-1], flush=True)
                del sets, first
                torch.cuda.empty_cache()
    return ["| size | op | dtype | backend | µs | GB/s (minimal bytes) | % of copy bandwidth | vs reference |",
            "|---|---|---|---|---|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--backends", nargs="+", default=["reference", "cuda", "triton"])
    parser.add_argument("--sweep", action="store_true", help="Triton block sizes × warps instead of the backends")
    parser.add_argument("--cluster", action="store_true", help="the cluster-masking sweep's ops (issue 22)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("roofline.py needs a CUDA device")
    peak = copy_bandwidth()
    mean, std = torch.tensor([0.5, 0.5, 0.5], device="cuda"), torch.tensor([0.25, 0.25, 0.25], device="cuda")
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; copy bandwidth {peak:.0f} GB/s")
    if args.cluster:
        print("\n".join(cluster_rows(peak, args.dtypes, args.backends, args.repeats)))
        return
    rows = [("| shape | x/grad dtype | backend | eager µs | graph µs | GB/s (graph, minimal bytes) | % of copy bandwidth "
             "| vs reference (graph) |"), "|---|---|---|---|---|---|---|---|"]
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes:
        n, c, h, w = SHAPES[name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            first = input_set(n, c, h, w, 1, dtype, generator)
            per_set = sum(t.numel() * t.element_size() for t in first)
            sets = [first] + [input_set(n, c, h, w, 1, dtype, generator)
                              for _ in range(max(1, min(16, ROTATION_BYTES // per_set)) - 1)]
            moved = minimal_bytes(first)
            if args.sweep:
                rows += sweep_triton(name, dtype_name, sets, mean, std, moved, peak, args.repeats)
                continue
            reasons = OPS["mask_step"].reasons(*first, PARAMS, mean, std, None)
            reference_ms = None
            for backend in args.backends:
                if reasons[backend]:
                    rows.append(f"| {name} | {dtype_name} | {backend} | – | – | – | – | {'; '.join(reasons[backend])} |")
                    continue

                def run(i, backend=backend, sets=sets):
                    mask_step(*sets[i % len(sets)], PARAMS, mean, std, backend=backend)

                eager = median_ms(run, args.repeats)
                ms = graph_ms(run, len(sets), args.repeats)
                reference_ms = ms if backend == "reference" else reference_ms
                gbs = moved / ms / 1e6
                speedup = f"{reference_ms / ms:.1f}×" if reference_ms else "–"
                rows.append(f"| {name} | {dtype_name} | {backend} | {eager * 1e3:.1f} | {ms * 1e3:.1f} | {gbs:.0f} | "
                            f"{100 * gbs / peak:.0f} % | {speedup} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
