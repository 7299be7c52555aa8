// pybind11 bindings for trojanguard._C: one module, one place where every C++ op is exposed.
// CPU implementations live in csrc/cpu/, CUDA ones in csrc/cuda/ (compiled only where CUDA is present).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "trojanguard native ops (C++ CPU; CUDA where built)";
  m.def("build_info", []() {
    py::dict info;
#ifdef TROJANGUARD_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cxx_standard"] = static_cast<long>(__cplusplus);
    return info;
  }, "Build details of the native extension.");
}
