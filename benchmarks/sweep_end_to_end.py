"""The cluster-masking sweep end to end (issue 22): heat maps per second of ``sweep_heatmaps`` with its prepared
encoder (:class:`~trojanguard.ops.cluster_sweep.SweepEncoder`) against an eager sweep written line by line the way a
researcher would (below: batched over the images at each window position, every centroid scored, drops scattered
with slicing), at equal heat maps (median per-image correlation), and against the physical limit: the encoder's
bare forward pass over the same number of masked images.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/sweep_end_to_end.py --arch small_cnn --size 32 --images 256
    PYTHONPATH=src python benchmarks/sweep_end_to_end.py --arch torchvision:resnet18 --size 224 --images 32 \
        --window 16 --stride 8 --variants prepared no_graphs no_bf16        # a GPU: the 224-px ResNet-18, W = 729

Each configuration is timed ``--repeats`` times after a warm-up; medians are reported, in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from trojanguard.models import build_model
from trojanguard.ops.cluster_mask import fill_values, sweep_windows
from trojanguard.ops.cluster_sweep import SweepEncoder, sweep_heatmaps
from trojanguard.ssl.backbones import build_backbone


def build_encoder(arch: str) -> torch.nn.Module:
    """A backbone of the SSL zoo (``small_cnn``, ``resnet18_cifar``) or a torchvision ResNet without its ``fc``
    (``torchvision:resnet18``, the ImageNet layout for 224 px), random weights."""
    if arch.startswith("torchvision:"):
        net = build_model(arch, num_classes=2)
        net.fc = torch.nn.Identity()
        return net
    return build_backbone(arch, in_channels=3)


@torch.no_grad()
def eager_sweep(encoder, x, centroids, labels, window, stride):
    """The researcher's sweep: per window position, fill it in every image, encode, score all centroids, take the
    own one, add the drop to the window's pixels."""
    n, _, h, w = x.shape
    heat, count = torch.zeros(n, h, w, device=x.device), torch.zeros(h, w, device=x.device)
    c = F.normalize(centroids, dim=1)
    base = (F.normalize(encoder(x), dim=1) @ c.T).gather(1, labels[:, None])[:, 0]
    fill = fill_values(x, "mean")
    tops = list(range(0, h - window + 1, stride))
    tops += [h - window] if tops[-1] != h - window else []
    lefts = list(range(0, w - window + 1, stride))
    lefts += [w - window] if lefts[-1] != w - window else []
    for top in tops:
        for left in lefts:
            masked = x.clone()
            masked[:, :, top : top + window, left : left + window] = fill
            own = (F.normalize(encoder(masked), dim=1) @ c.T).gather(1, labels[:, None])[:, 0]
            heat[:, top : top + window, left : left + window] += (base - own)[:, None, None]
            count[top : top + window, left : left + window] += 1
    return heat / count.clamp_min(1)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def correlation(a, b):
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def measure(prepared, x, own, windows, copies, eager_s, eager_heat, args, run) -> dict:
    """One variant: heat maps per second, against the eager sweep and against the bare forward passes."""
    seconds, heat = timed(run(lambda: sweep_heatmaps(prepared, x, own, windows, batch_size=args.batch_size)),
                          args.repeats)
    chunks = -(-args.images * len(windows) // len(copies))
    with torch.no_grad():
        bare_s, _ = timed(run(lambda: [prepared(copies) for _ in range(chunks)]), args.repeats)
    return {"images_per_s": round(args.images / seconds, 1), "speedup_vs_eager": round(eager_s / seconds, 2),
            "cost_vs_bare_forward": round(seconds / bare_s, 3),
            "median_correlation": round(float(correlation(heat.cpu(), eager_heat.cpu()).median()), 5),
            "steps": getattr(prepared, "steps", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096, help="masked copies per forward of the sweep")
    parser.add_argument("--variants", nargs="+", default=["plain", "prepared", "no_bf16"],
                        help="plain: the encoder as given; prepared: SweepEncoder's defaults; no_bf16: without bf16; "
                             "no_graphs: without CUDA graphs (a GPU)")
    parser.add_argument("--results", help="also append the row to this JSON-lines file")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = build_encoder(args.arch).to(device).eval()
    x = torch.rand(args.images, 3, args.size, args.size, device=device)
    centroids = torch.randn(args.clusters, encoder(x[:2]).shape[1], device=device)
    with torch.no_grad():
        labels = (F.normalize(encoder(x), dim=1) @ F.normalize(centroids, dim=1).T).argmax(1)
    own = centroids[labels]
    windows = sweep_windows(args.size, args.size, args.window, args.stride)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def call():
            out = fn()
            sync()
            return out
        return call

    eager_s, eager_heat = timed(run(lambda: eager_sweep(encoder, x, centroids, labels, args.window, args.stride)),
                                args.repeats)
    row = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": args.arch, "size": args.size,
           "images": args.images, "windows": len(windows), "eager_images_per_s": round(args.images / eager_s, 1)}
    encoders = {"plain": lambda m: m, "prepared": lambda m: SweepEncoder(m, device),
                "no_bf16": lambda m: SweepEncoder(m, device, low_precision=False),
                "no_graphs": lambda m: SweepEncoder(m, device, cuda_graphs=False)}
    copies = torch.rand(min(args.batch_size, args.images * len(windows)), 3, args.size, args.size, device=device)
    for variant in args.variants:
        try:
            row[variant] = measure(encoders[variant](encoder), x, own, windows, copies, eager_s, eager_heat, args, run)
        except Exception as exc:  # noqa: BLE001 — a variant that fails (out of memory) is a result; the others run
            row[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
