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


def test_readme_conversion_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Use it in your network\n.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example saves model.pt to the working directory
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    model, restored = namespace["model"].eval(), namespace["restored"].eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
