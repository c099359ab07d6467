"""Components by name: the UI's one registry, after LLaMA-Factory's webui ``Manager``.

Each tab registers its components under a name when it lays them out; handlers and other
tabs look them up by that name. A training-form field is named by its option's dotted
``RunConfig`` name (``"lora.rank"``, ``"*.batch_size"``, see ``app.forms``), so a handler
that takes the form gets ``{name: value}`` and never depends on the order of components.
Other components are named ``"<tab>.<what>"`` (``"runs.run_id"``).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from gradio.components import Component


class Manager:
    """Holds one Blocks' components by name; one per ``build_demo`` call, never shared."""

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}
        self._name_of: dict[int, str] = {}

    def add(self, name: str, component: Any) -> Any:
        """Register ``component`` under ``name`` and return it (so layouts can use it inline)."""
        if name in self._by_name:
            raise ValueError(f"a component is already registered as {name!r}")
        self._by_name[name] = component
        self._name_of[id(component)] = name
        return component

    def __getitem__(self, name: str) -> Any:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no component is registered as {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, *names: str) -> list[Any]:
        """The components of ``names``, in that order (for outputs and short input lists)."""
        return [self[name] for name in names]

    def inputs(self, names: Iterable[str]) -> set[Component]:
        """The components of ``names`` as a set: Gradio then calls the handler with one dict {component: value}."""
        return {self[name] for name in names}

    def values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        """Gradio's {component: value} as {name: value}."""
        return {self._name_of[id(component)]: value for component, value in data.items()}

    def updates(self, by_name: Mapping[str, Any]) -> dict[Any, Any]:
        """{name: update} as the {component: update} a handler returns."""
        return {self[name]: value for name, value in by_name.items()}
