"""Name -> factory tables for the parts a config or the CLI picks by name.

Each table raises one clear error naming the unknown value and the valid choices,
so a typo in a config or on the command line never becomes a stack trace.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, TypeVar

T = TypeVar("T", bound=Callable)


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(sorted(self._entries))}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list:
        return sorted(self._entries)


MODELS = Registry("model")
SAMPLERS = Registry("sampler")
DATASETS = Registry("dataset")
TOKENIZERS = Registry("tokenizer")
