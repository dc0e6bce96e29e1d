"""Modules that are also their main function: ``torchddn.nodes.qp`` is the module ``torchddn/nodes/qp.py`` and
``torchddn.nodes.qp(Q, p, ...)`` calls the function ``qp`` it defines.

A submodule named like its function would otherwise be shadowed (or shadow it) in the package namespace. Each such
module ends with ``make_callable(__name__)``, which sets its class to :class:`CallableModule`, a
:class:`types.ModuleType` subclass whose ``__call__`` forwards to the module's function of the same name.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class CallableModule(types.ModuleType):
    """A module whose call forwards to its attribute named like the module's last name component."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(name: str) -> None:
    """Make the module ``sys.modules[name]`` callable (see the module docstring)."""
    sys.modules[name].__class__ = CallableModule
