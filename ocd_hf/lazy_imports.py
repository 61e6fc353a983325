"""Lazy package attributes and deferred ``transformers`` Auto-class registration.

``import ocd_hf`` (and ``ocd-hf --help``) must not pay for diffusers, datasets, matplotlib or
scikit-learn until a name that needs them is used: the packages export their names through a module
``__getattr__`` (PEP 562, the pattern of ``transformers``' ``_LazyModule``, written here with the
standard library alone so that it does not depend on a private ``transformers`` helper), and the
generators' model classes are registered with ``AutoModel`` when the first config of their type is
built (``AutoModel.from_pretrained`` builds the config before it looks the model class up).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_attributes(package: str, structure: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``structure``'s names on first use.

    ``structure`` maps a submodule (relative, e.g. ``".harvest"``) to the names it exports. A name is
    imported once and then cached as a real attribute of the package.
    """
    where = {name: submodule for submodule, names in structure.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__


_DEFERRED: dict[str, list[Callable[[], None]]] = {}


def defer_registration(model_type: str, register: Callable[[], None]) -> None:
    """Run ``register`` (e.g. ``AutoModel.register(config_class, model_class)``) when the first config of
    ``model_type`` is built (:func:`complete_registration`), not at import."""
    _DEFERRED.setdefault(model_type, []).append(register)


def complete_registration(model_type: str) -> None:
    """Run the registrations deferred for ``model_type``, once; configs call it from ``__init__``."""
    for register in _DEFERRED.pop(model_type, []):
        register()
