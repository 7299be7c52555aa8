"""Triton kernels of trojanguard, shipped as ``trojanguard._kernels``.

One file per op, private ``_<op>_fwd_kernel`` names. Importing this package never imports Triton;
each kernel module does so itself, so a machine without Triton still imports trojanguard.
"""
