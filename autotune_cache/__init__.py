"""autotune_cache: tuned launch configurations of the Triton kernels, shipped and learned.

A launcher asks `get_config(kernel, device=..., dtype=..., shape=layer_shape(geo),
candidates=..., default=..., benchmark=..., footprint=...)` for its config; see `cache` for the
lookup order, `store` for the file format, `keys` for the shape buckets, `prune` for what is
benchmarked, and `python -m autotune_cache --help` for the command line (show, tune, export,
clear).

Environment: ATOMCONV_CACHE_DIR (where learned entries live; default $XDG_CACHE_HOME/atomconv
or ~/.cache/atomconv), ATOMCONV_AUTOTUNE=0 (no benchmarking, no learned entries: shipped tables
and defaults only), TRITON_INTERPRET=1 (always the default config).
"""

from .cache import AutotuneCache, autotune_enabled, cache_root, default_cache, get_config
from .keys import layer_shape
from .prune import DeviceLimits, Footprint, prune_candidates, spilling_configs
from .tune import register_tuner, time_launch

__all__ = [
    "AutotuneCache", "DeviceLimits", "Footprint", "autotune_enabled", "cache_root", "default_cache",
    "get_config", "layer_shape", "prune_candidates", "register_tuner", "spilling_configs",
    "time_launch",
]
