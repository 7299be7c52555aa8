// pybind11 bindings for trojanguard._C: one module, one place where every C++ op is exposed.
// CPU implementations live in csrc/cpu/, CUDA ones in csrc/cuda/ (compiled only where CUDA is present).
//
// The module does not link libtorch: ops take raw data pointers (tensor.data_ptr()), sizes, dtype codes
// and scalars in a dict built by trojanguard/_native.py, which validates and allocates with torch.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cluster_sweep.h"
#include "mask_step.h"

namespace py = pybind11;

namespace {

// Bumped whenever a signature below changes; _native.py refuses (and rebuilds) a stale extension.
constexpr int kApiVersion = 2;

#ifndef TROJANGUARD_CUDA_NOTE
#define TROJANGUARD_CUDA_NOTE ""
#endif

template <typename T>
T* pointer(const py::dict& d, const char* key) {
  return reinterpret_cast<T*>(d[key].cast<std::uintptr_t>());
}

trojanguard::MaskStepArgs mask_step_args(const py::dict& d) {
  trojanguard::MaskStepArgs a{};
  a.theta = pointer<float>(d, "theta");
  a.exp_avg = pointer<float>(d, "exp_avg");
  a.exp_avg_sq = pointer<float>(d, "exp_avg_sq");
  a.x = pointer<const void>(d, "x");
  a.delta = pointer<const float>(d, "delta");
  a.grad = pointer<const void>(d, "grad");
  a.seeds = pointer<const int64_t>(d, "seeds");
  a.mean = pointer<const float>(d, "mean");
  a.std = pointer<const float>(d, "std");
  a.delta_next = pointer<float>(d, "delta_next");
  a.out = pointer<void>(d, "out");
  a.x_dtype = d["x_dtype"].cast<int>();
  a.grad_dtype = d["grad_dtype"].cast<int>();
  a.out_dtype = d["out_dtype"].cast<int>();
  a.batch = d["batch"].cast<int64_t>();
  a.channels = d["channels"].cast<int64_t>();
  a.mask_channels = d["mask_channels"].cast<int64_t>();
  a.height = d["height"].cast<int64_t>();
  a.width = d["width"].cast<int64_t>();
  a.beta1 = d["beta1"].cast<float>();
  a.beta2 = d["beta2"].cast<float>();
  a.eps = d["eps"].cast<float>();
  a.l1_weight = d["l1_weight"].cast<float>();
  a.tv_weight = d["tv_weight"].cast<float>();
  a.step_size = d["step_size"].cast<float>();
  a.bias_correction2_sqrt = d["bias_correction2_sqrt"].cast<float>();
  a.next_step = d["next_step"].cast<int64_t>();
  return a;
}

trojanguard::OccludeArgs occlude_args(const py::dict& d) {
  trojanguard::OccludeArgs a{};
  a.x = pointer<const void>(d, "x");
  a.windows = pointer<const int64_t>(d, "windows");
  a.values = pointer<const float>(d, "values");
  a.out = pointer<void>(d, "out");
  a.x_dtype = d["x_dtype"].cast<int>();
  a.batch = d["batch"].cast<int64_t>();
  a.channels = d["channels"].cast<int64_t>();
  a.height = d["height"].cast<int64_t>();
  a.width = d["width"].cast<int64_t>();
  a.windows_count = d["windows_count"].cast<int64_t>();
  return a;
}

trojanguard::ClusterDropArgs cluster_drop_args(const py::dict& d) {
  trojanguard::ClusterDropArgs a{};
  a.features = pointer<const void>(d, "features");
  a.centroids = pointer<const float>(d, "centroids");
  a.base = pointer<const float>(d, "base");
  a.out = pointer<float>(d, "out");
  a.features_dtype = d["features_dtype"].cast<int>();
  a.batch = d["batch"].cast<int64_t>();
  a.windows_count = d["windows_count"].cast<int64_t>();
  a.dim = d["dim"].cast<int64_t>();
  return a;
}

trojanguard::OcclusionHeatArgs occlusion_heat_args(const py::dict& d) {
  trojanguard::OcclusionHeatArgs a{};
  a.drops = pointer<const float>(d, "drops");
  a.windows = pointer<const int64_t>(d, "windows");
  a.out = pointer<float>(d, "out");
  a.batch = d["batch"].cast<int64_t>();
  a.windows_count = d["windows_count"].cast<int64_t>();
  a.height = d["height"].cast<int64_t>();
  a.width = d["width"].cast<int64_t>();
  return a;
}

// The sweep's ops take no workspace; each binding builds its Args from the dict while holding the GIL and runs
// the kernel without it. <op>_cpu(args, num_threads):
template <typename Args>
void bind_cpu(py::module_& m, const std::string& op, Args (*parse)(const py::dict&), void (*cpu)(const Args&, int),
              const std::string& doc) {
  m.def((op + "_cpu").c_str(), [parse, cpu](const py::dict& args, int num_threads) {
    const Args a = parse(args);
    py::gil_scoped_release release;
    cpu(a, num_threads);
  }, py::arg("args"), py::arg("num_threads"), (doc + " On CPU memory.").c_str());
}

#ifdef TROJANGUARD_WITH_CUDA
// <op>_cuda_workspace_bytes(args, device) (always 0) and <op>_cuda(args, device, stream, workspace).
template <typename Args>
void bind_cuda(py::module_& m, const std::string& op, Args (*parse)(const py::dict&),
               void (*cuda)(const Args&, int, std::uintptr_t), const std::string& doc) {
  m.def((op + "_cuda_workspace_bytes").c_str(), [](const py::dict&, int) { return int64_t{0}; },
        py::arg("args"), py::arg("device"), ("Scratch bytes that " + op + "_cuda needs: none.").c_str());
  m.def((op + "_cuda").c_str(), [parse, cuda](const py::dict& args, int device, std::uintptr_t stream,
                                               std::uintptr_t /*workspace*/) {
    const Args a = parse(args);
    py::gil_scoped_release release;
    cuda(a, device, stream);
  }, py::arg("args"), py::arg("device"), py::arg("stream"), py::arg("workspace"),
  (doc + " Enqueued on a CUDA stream (device memory; asynchronous).").c_str());
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "trojanguard native ops (C++ CPU; CUDA where built)";
  m.attr("API_VERSION") = kApiVersion;

  m.def("build_info", []() {
    py::dict info;
    info["api_version"] = kApiVersion;
#ifdef TROJANGUARD_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_note"] = std::string(TROJANGUARD_CUDA_NOTE);
    info["openmp"] = trojanguard::cpu_has_openmp();
    info["cpu_multiversioning"] = trojanguard::cpu_has_multiversioning();
    info["cxx_standard"] = static_cast<long>(__cplusplus);
    return info;
  }, "Build details of the native extension.");

  m.def("mask_step_cpu", [](const py::dict& args, int num_threads) {
    const trojanguard::MaskStepArgs a = mask_step_args(args);
    py::gil_scoped_release release;
    trojanguard::mask_step_cpu(a, num_threads);
  }, py::arg("args"), py::arg("num_threads"),
  "One fused mask step on CPU memory; the dict's keys are the fields of MaskStepArgs (csrc/mask_step.h).");

  // The cluster-masking sweep (csrc/cluster_sweep.h); each dict's keys are the fields of the op's Args struct.
  const char* occlude_doc = "Every image with every window filled (OccludeArgs).";
  const char* cluster_drop_doc = "base − cos(feature row, own centroid) per masked copy (ClusterDropArgs).";
  const char* occlusion_heat_doc = "Heat maps: the mean drop of the windows covering each pixel (OcclusionHeatArgs).";
  bind_cpu(m, "occlude", occlude_args, trojanguard::occlude_cpu, occlude_doc);
  bind_cpu(m, "cluster_drop", cluster_drop_args, trojanguard::cluster_drop_cpu, cluster_drop_doc);
  bind_cpu(m, "occlusion_heat", occlusion_heat_args, trojanguard::occlusion_heat_cpu, occlusion_heat_doc);
#ifdef TROJANGUARD_WITH_CUDA
  bind_cuda(m, "occlude", occlude_args, trojanguard::occlude_cuda, occlude_doc);
  bind_cuda(m, "cluster_drop", cluster_drop_args, trojanguard::cluster_drop_cuda, cluster_drop_doc);
  bind_cuda(m, "occlusion_heat", occlusion_heat_args, trojanguard::occlusion_heat_cuda, occlusion_heat_doc);
#endif

#ifdef TROJANGUARD_WITH_CUDA
  m.def("cuda_probe", &trojanguard::cuda_probe,
        "Empty when the extension's CUDA runtime sees a device, else the reason it does not.");
  m.attr("CUDA_MAX_WIDTH") = trojanguard::kCudaMaxWidth;
  m.attr("CUDA_MAX_CHANNELS") = trojanguard::kCudaMaxChannels;
  m.def("mask_step_cuda_workspace_bytes", [](const py::dict& args, int device) {
    return trojanguard::mask_step_cuda_workspace_bytes(mask_step_args(args), device);
  }, py::arg("args"), py::arg("device"), "Scratch bytes that mask_step_cuda needs for these args.");
  m.def("mask_step_cuda", [](const py::dict& args, int device, std::uintptr_t stream, std::uintptr_t workspace) {
    const trojanguard::MaskStepArgs a = mask_step_args(args);
    py::gil_scoped_release release;
    trojanguard::mask_step_cuda(a, device, stream, reinterpret_cast<void*>(workspace));
  }, py::arg("args"), py::arg("device"), py::arg("stream"), py::arg("workspace"),
  "Enqueue one fused mask step on a CUDA stream (device memory; asynchronous).");
#endif
}
