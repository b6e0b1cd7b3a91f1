"""One registry per plugin family: a name -> implementation table with a one-line error on lookup.

Every plugin family of moesim (DESIGN.md) is a ``Registry``; implementations register themselves
with its ``register(name)`` class decorator, and each family's config group lists the same names:

==========================  ======================================  ==========================
family                      registry                                config key
==========================  ======================================  ==========================
prefetch / caching policy   ``sim.policies.base.PREFETCH_POLICIES``   ``policy/prefetch=NAME``
speculation policy          ``sim.policies.speculation.SPECULATION_POLICIES``  ``policy/speculation=NAME``
EP placement                ``sim.policies.ep.EP_PLACEMENTS``         ``policy/ep=NAME``
EP token scheduling         ``sim.policies.ep.TOKEN_SCHEDULERS``      (next issue)
scheduler                   ``sim.schedulers.SCHEDULERS``             ``scheduler=NAME``
drafter                     ``sim.speculation.DRAFTERS``              ``policy.speculation.drafter``
cost model                  ``hw.cost.COST_MODELS``                   ``hw.cost_model``
collective                  ``hw.collectives.COLLECTIVES``            (used by the loop, TP and EP)
==========================  ======================================  ==========================
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .validation import ConfigError


class Registry:
    """Implementations of one plugin family by name.

    ``key``: the config key that names one (``policy.prefetch.name``), ``label``: what one is
    called in errors (``prefetch policy``). ``register(name)`` is a decorator for a class or a
    function; a class gets ``name`` set on it (``set_name``). ``get(name)`` fails with one line
    listing the registered names.
    """

    def __init__(self, key: str, label: str, set_name: bool = True,
                 loader: Optional[Callable[[], Any]] = None):
        self.key, self.label = key, label
        self.set_name = set_name
        self.classes: dict[str, Any] = {}
        self._loader = loader   # imports the module whose decorators fill the registry (lazily)

    def register(self, name: str):
        def deco(obj):
            if name in self.classes:
                raise ValueError(f"{self.label} {name!r} registered twice")
            if self.set_name and isinstance(obj, type):
                obj.name = name
            self.classes[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        self._load()
        return sorted(self.classes)

    def get(self, name: str) -> Any:
        if name not in self.classes:
            self._load()
        if name not in self.classes:
            raise ConfigError(f"{self.key}={name!r} is not a known {self.label}; "
                              f"choose one of: {', '.join(sorted(self.classes))}")
        return self.classes[name]

    def __contains__(self, name: str) -> bool:
        if name not in self.classes:
            self._load()
        return name in self.classes

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()
