"""The README's usage example runs as written."""

import re
from pathlib import Path

import torch


def test_readme_usage_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 8, 20, 20)
    assert isinstance(namespace["layer"](torch.randn(1, 16, 31, 31)), torch.Tensor)
