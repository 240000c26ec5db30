"""The README's tour runs as written."""

import pathlib
import re

import pytest


def _python_blocks():
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(_python_blocks())))
def test_readme_python_blocks_run(i, capsys):
    exec(compile(_python_blocks()[i], f"README.md block {i}", "exec"), {})
