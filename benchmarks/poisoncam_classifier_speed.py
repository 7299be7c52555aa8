"""PoisonCAM's poison classifier: training steps in channels-last (NHWC, what ``PoisonCAM`` runs) against NCHW (the
reference layout), in one run on this machine's CPU.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/poisoncam_classifier_speed.py [--size 16] [--batch 64]

Each repeat times ``--steps`` SGD steps of the small CNN (``build_model("small_cnn", num_classes=2)``, as
``PoisonCAM._train_classifiers`` builds it) on one random batch, the two layouts alternating; it prints milliseconds a
step per layout (median and range over the repeats), their ratio, and the largest difference of the two layouts'
losses after the timed steps (the same function, its sums in another order).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trojanguard.models.nets import build_model


def step_ms(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """Milliseconds a training step (after two warm-up steps) and the last step's loss."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss = None
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1000, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=16, help="image side (the SSL zoo's digits: 16)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="PoisonCAM's classifier_batch default")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.channels, args.size, args.size, generator=generator)
    y = torch.randint(0, 2, (args.batch,), generator=generator)
    times: dict[str, list[float]] = {"NCHW": [], "channels-last": []}
    gaps = []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        reference = build_model("small_cnn", num_classes=2, in_channels=args.channels)
        torch.manual_seed(0)
        fast = build_model("small_cnn", num_classes=2, in_channels=args.channels).to(memory_format=torch.channels_last)
        ms, loss = step_ms(reference, x, y, args.steps)
        times["NCHW"].append(ms)
        ms_fast, loss_fast = step_ms(fast, x.contiguous(memory_format=torch.channels_last), y, args.steps)
        times["channels-last"].append(ms_fast)
        gaps.append(abs(loss - loss_fast))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch} × {args.channels} × "
          f"{args.size} × {args.size}, {args.steps} steps × {args.repeats} repeats")
    for name, values in times.items():
        print(f"  {name:14s} {statistics.median(values):7.2f} ms/step (range {min(values):.2f}–{max(values):.2f})")
    ratios = [a / b for a, b in zip(times["NCHW"], times["channels-last"])]
    print(f"  channels-last speed-up: {statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}); "
          f"largest loss difference after the steps {max(gaps):.1e}")


if __name__ == "__main__":
    main()
