"""Builds the optional C++ extension ``trojanguard._C`` (pybind11).

The extension is optional: if no compiler is present the pure-PyTorch reference paths still work,
and ``trojanguard info`` reports the C++ backend as unavailable.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "trojanguard._C",
        ["csrc/bindings.cpp"],
        cxx_std=17,
        optional=True,
    )
]

setup(ext_modules=ext_modules)
