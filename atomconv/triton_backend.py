"""Loading the Triton backend, the top-level package `kernels`, and recognising when that name
belongs to someone else.

atomconv ships its kernels as the top-level package `kernels`. Hugging Face's PyPI package
`kernels` installs the same top-level name: installing it overwrites our `kernels/__init__.py`,
uninstalling it deletes it. Ours carries the marker `ATOMCONV_KERNELS = True`; anything
else under that name is refused with a message that names the clash and the way out, instead
of failing later with an unrelated AttributeError.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from types import ModuleType


class KernelsPackageClash(ImportError):
    """The importable `kernels` is not atomconv's Triton kernels (or is missing)."""


def _other_distributions() -> list[str]:
    """Installed distributions other than atomconv that provide the top-level name `kernels`."""
    try:
        providers = importlib.metadata.packages_distributions().get("kernels", [])
    except Exception:  # metadata of some unrelated distribution is unreadable: name nobody
        return []
    return sorted({name for name in providers if name.lower() != "atomconv"})


def clash_message(found: str) -> str:
    others = _other_distributions()
    owner = f" (installed by: {', '.join(others)})" if others else ""
    return (
        f"atomconv's Triton backend is the top-level package `kernels`, but the `kernels` Python imports {found}"
        f"{owner}. Hugging Face's PyPI package `kernels` uses the same top-level name and overwrites or deletes "
        f"atomconv's when it is installed or uninstalled. Way out: `pip uninstall kernels` (the Hugging Face one), "
        f"then reinstall atomconv (`pip install --force-reinstall --no-deps atomconv`, or `pip install -e .` from "
        f"a checkout), or keep the two in separate environments. The reference backend (backend='reference') "
        f"does not need `kernels`."
    )


@functools.cache
def triton_kernels() -> ModuleType:
    """atomconv's `kernels` package (importing it imports triton). Raises KernelsPackageClash,
    naming the clash and the way out, when `kernels` is missing or is another package."""
    try:
        kernels = importlib.import_module("kernels")
    except ModuleNotFoundError as error:
        if error.name != "kernels":
            raise  # ours, missing a dependency of its own (triton): say that, not a clash
        raise KernelsPackageClash(clash_message("nothing (it is not installed)")) from error
    if getattr(kernels, "ATOMCONV_KERNELS", False) is not True:
        where = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", [])) or "?"
        raise KernelsPackageClash(clash_message(f"another package, from {where}"))
    return kernels
