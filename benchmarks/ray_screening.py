"""Screening throughput: the local engine vs Ray Data with 1 and 2 workers, same run, same machine.

Data: the first ``--samples`` images of the digits zoo's BadNets poisoned training set; detectors ``cd`` (the
per-image optimisation, ``--steps``) and ``features`` (one forward pass; fitted once on the driver). Each
configuration screens into a fresh folder with ``report=False``; reported: the scoring phase's images/s (the
summary's ``images_per_second``: blocks scored and committed, actor start included for Ray) and the end-to-end
seconds of ``screen`` (fit, scoring, results). The Ray cluster is started once (``ray.init(num_cpus=2)``) before the
Ray rows; its start is reported apart. Local runs use the process's torch threads (``--local-threads``).

Run: ``PYTHONPATH=src python benchmarks/ray_screening.py [--samples 512 --steps 30]``; prints a table and appends
JSON lines to ``--out`` (default benchmarks/ray_screening_results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("ray_screening_results.jsonl")))
    args = parser.parse_args()

    import ray
    import torch

    from trojanguard.screening import screen
    from trojanguard.zoo import ZooConfig, get_backdoored_model

    entry = get_backdoored_model(ZooConfig(attack="badnets"), show_progress=False)
    x = entry.train.dataset.x[: args.samples]
    detectors = {"cd": {"steps": args.steps}, "features": None}
    rows = []

    def run(detector, engine, workers=None):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            result = screen(entry.model, x, detector=detector, detector_options=detectors[detector], out_dir=tmp,
                            calibration=None, batch_size=args.batch_size, report=False, show_progress=False,
                            engine=engine, ray=None if engine == "local" else {"workers": workers})
            seconds = time.perf_counter() - started
        rows.append({"detector": detector, "engine": engine if engine == "local" else f"ray, {workers} workers",
                     "images_per_second": result.summary["run"]["images_per_second"], "seconds": seconds})

    torch.set_num_threads(args.local_threads)
    for detector in detectors:
        run(detector, "local")
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster_start = time.perf_counter() - started
    for detector in detectors:
        for workers in (1, 2):
            run(detector, "ray", workers)
    ray.shutdown()

    context = {"samples": args.samples, "steps": args.steps, "batch_size": args.batch_size,
               "local_threads": args.local_threads, "ray": ray.__version__, "torch": torch.__version__,
               "cluster_start_seconds": cluster_start, "machine": platform.processor() or platform.machine(),
               "date": time.strftime("%Y-%m-%d")}
    print(f"Ray cluster start: {cluster_start:.1f} s (not in the rows)")
    print(f"{'detector':<10} {'engine':<16} {'images/s':>9} {'seconds':>8}")
    with open(args.out, "a", encoding="utf-8") as out:
        for row in rows:
            print(f"{row['detector']:<10} {row['engine']:<16} {row['images_per_second']:>9.1f} {row['seconds']:>8.1f}")
            out.write(json.dumps({**row, **context}) + "\n")


if __name__ == "__main__":
    main()
