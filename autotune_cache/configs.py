"""Configs as the cache stores them: plain {field: int} dicts, whatever type a kernel uses.

A kernel's configs are either mappings of ints or dataclasses of ints (such as
`kernels.configs.TileConfig`); the cache turns them into dicts to store and compare them,
and back into the kernel's own type, taken from the kernel's default config.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, TypeVar

Config = TypeVar("Config")


def config_dict(config: object) -> dict[str, int]:
    """The config as a {field: value} dict."""
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise TypeError(f"a config must be a mapping or a dataclass instance, got {type(config).__name__}")


def config_from_dict(values: Mapping[str, int], like: Config) -> Config:
    """`values` as a config of the same type as `like`; TypeError when its fields differ."""
    if isinstance(like, Mapping):
        if set(values) != set(like):
            raise TypeError(f"config fields {sorted(values)} differ from {sorted(like)}")
        return type(like)(values)
    return type(like)(**values)
