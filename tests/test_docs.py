"""The documentation's Python examples run as written (each file's blocks in order, one namespace)."""

import re
from pathlib import Path

import helpers
import pytest

ROOT = helpers.ROOT
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(path, capsys, request, monkeypatch):
    if any("SSLZooConfig(" in block for block in python_blocks(path)):
        # the SSL zoo's encoders are this session's (tests/conftest.py): trained once, not again for the example,
        # and the example is run on the same worker (tests/conftest.py, SESSION_MODEL_FIXTURES)
        request.getfixturevalue("badencoder_zoo")
        monkeypatch.setenv("TROJANGUARD_CACHE", str(request.getfixturevalue("ssl_zoo_cache")))
    namespace: dict = {}
    for block in python_blocks(path):
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102 — our own documentation
    assert capsys.readouterr().out  # every example prints what it shows
