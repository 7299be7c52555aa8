"""Triton kernels of trojanguard, shipped as ``trojanguard._kernels``.

One file per op, private ``_<op>_fwd_kernel`` names. Importing this package never imports Triton;
each kernel module does so itself, so a machine without Triton still imports trojanguard.

Run from the repository root (``python -m pytest``, ``python -m trojanguard.cli``), the root is on ``sys.path`` and this
folder would shadow an installed distribution named ``kernels`` (Hugging Face's, which transformers imports when it is
installed). Imported under that top-level name, this package hands the name over to the installed one.
"""

if __name__ == "kernels":  # imported as a top-level package from the repository root, not as trojanguard._kernels
    def _hand_over_to_installed_kernels() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
        if spec is None or spec.loader is None:
            return  # nothing installed under that name: this package may keep it
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import system returns what sys.modules holds after this runs
        spec.loader.exec_module(module)

    _hand_over_to_installed_kernels()
