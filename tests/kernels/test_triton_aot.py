"""Every Triton kernel of both families (mask_step, cluster_sweep) compiles ahead of time for an sm_90 GPU, with no
device: TRITON_INTERPRET=1 runs the kernels' Python, so it cannot catch what only Triton's compiler and ptxas
reject (types, layouts, register limits). The tests run under TRITON_INTERPRET=1, where ``triton.jit`` gives no
compilable kernel, so the compiles run once in a child process without it (this file run as a script). Skipped,
with the reason, where Triton or its CUDA toolchain is missing.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from trojanguard._kernels import cluster_sweep, mask_step

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size

MASK_STEP_FWD = {
    **{name: "*fp32" for name in ("theta_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "delta_ptr", "mean_ptr", "std_ptr",
                                   "halo_ptr", "delta_next_ptr")},
    "x_ptr": "*{x}", "grad_ptr": "*{x}", "seeds_ptr": "*i64", "out_ptr": "*{x}",
    **{name: "i32" for name in ("C", "M", "H", "W", "HW", "TILES", "CHANNELS")},
    **{name: "fp32" for name in ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "step_size",
                                  "bias_correction2_sqrt", "l1_weight", "tv_weight", "tv_norm")},
    "next_step": "i32",
}

KERNELS = {  # name: (kernel, signature with {x} the image dtype, constexprs)
    "mask_step_halo": (mask_step._mask_step_halo_kernel,
                       {"theta_ptr": "*fp32", "halo_ptr": "*fp32", "HW": "i32", "W": "i32", "TILES": "i32"},
                       {"BLOCK": 1024, "BLOCK_W": 256}),
    "mask_step_fwd": (mask_step._mask_step_fwd_kernel, MASK_STEP_FWD,
                      {"HAS_NORM": True, "HAS_HALO": True, "BLOCK": 1024, "BLOCK_C": 4}),
    "occlude": (cluster_sweep._occlude_kernel,
                {"x_ptr": "*{x}", "windows_ptr": "*i64", "values_ptr": "*{x}", "out_ptr": "*{x}",
                 **{name: "i32" for name in ("C", "HW", "Wd", "W", "TILES")}},
                {"BLOCK": cluster_sweep.BLOCK}),
    "cluster_drop": (cluster_sweep._cluster_drop_kernel,
                     {"features_ptr": "*{x}", "centroids_ptr": "*fp32", "base_ptr": "*fp32", "out_ptr": "*fp32",
                      "ROWS_TOTAL": "i32", "W": "i32", "D": "i32"},
                     {"ROWS": cluster_sweep.ROWS, "BLOCK_D": cluster_sweep.BLOCK_D, "EPS": cluster_sweep.EPS}),
    "occlusion_heat": (cluster_sweep._occlusion_heat_kernel,
                       {"drops_ptr": "*fp32", "windows_ptr": "*i64", "out_ptr": "*fp32",
                        **{name: "i32" for name in ("HW", "Wd", "W", "TILES")}},
                       {"BLOCK": cluster_sweep.BLOCK}),
}


CASES = [(name, dtype) for name, (_, signature, _) in KERNELS.items() for dtype in ("fp32", "bf16")
         if dtype == "fp32" or any("{x}" in v for v in signature.values())]


def compile_all() -> dict[str, str]:
    """``{"name/dtype": "ok" | "toolchain: …" | "error: …"}`` for every case (run without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, dtype in CASES:
        kernel, signature, constexprs = KERNELS[name]
        types = {arg: kind.format(x=dtype) for arg, kind in signature.items()}
        types.update({arg: "constexpr" for arg in constexprs})
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=types, constexprs=constexprs),
                                      target=GPUTarget(*TARGET))
            ok = compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
            results[f"{name}/{dtype}"] = "ok" if ok else "error: no sm_90 cubin in the output"
        except Exception as exc:  # noqa: BLE001 — reported per case
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            results[f"{name}/{dtype}"] = ("toolchain: " if "ptxas" in text or "No such file" in text else "error: ") + text
    return results


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"the compile process failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{n}/{d}" for n, d in CASES])
def test_the_kernel_compiles_for_sm_90(compiled, case):
    result = compiled[case]
    if result.startswith("toolchain: "):
        print(f"skipped {case}: Triton's CUDA toolchain is missing ({result})")
        pytest.skip(result)
    assert result == "ok", result


if __name__ == "__main__":
    print(json.dumps(compile_all()))
