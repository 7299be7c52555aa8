"""The repository's ``kernels/`` folder, on ``sys.path`` when run from the root, must not shadow an installed
distribution named ``kernels`` (Hugging Face's: transformers imports it where it is installed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_kernels_file(*after_root: Path) -> str:
    """The file `import kernels` loads with the root first on sys.path and `after_root` last (no site-packages)."""
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path += sys.argv[2:]; import kernels; "
            "print(kernels.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT), *map(str, after_root)], capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_an_installed_kernels_package_wins_over_the_repository_folder(tmp_path):
    installed = tmp_path / "kernels"
    installed.mkdir()
    (installed / "__init__.py").write_text("MARK = 'installed'\n")
    assert Path(_imported_kernels_file(tmp_path)) == installed / "__init__.py"


def test_without_one_the_repository_folder_still_imports(tmp_path):
    assert Path(_imported_kernels_file(tmp_path)) == ROOT / "kernels" / "__init__.py"


def test_the_shipped_name_is_the_repository_folder():
    import trojanguard._kernels

    assert Path(trojanguard._kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
