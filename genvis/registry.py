"""Name -> factory tables for the parts a config or the CLI picks by name.

An entry is a factory plus, optionally, the dataclass schema that types its config section and
free-form metadata (a model's `family`, a sampler's grid defaults). Each table knows the modules
that hold genvis's own entries and imports one only when a name from it is looked up, so listing
names (e.g. for `--help`) imports nothing heavy, and config.py can type a section through its
entry without importing model code itself. An unknown name raises one KeyError naming the valid
choices, so a typo never becomes a stack trace.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Optional, TypeVar

T = TypeVar("T", bound=Callable)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable
    schema: Optional[type] = None  # dataclass typing this entry's config section
    meta: Dict[str, object] = field(default_factory=dict)


class Registry:
    """`builtins` maps each of genvis's own names to the module whose import registers it."""

    def __init__(self, kind: str, builtins: Optional[Dict[str, str]] = None):
        self.kind = kind
        self._builtins = dict(builtins or {})
        self._entries: Dict[str, Entry] = {}

    def register(self, name: str, schema: Optional[type] = None, **meta) -> Callable[[T], T]:
        def decorator(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, schema, dict(meta))
            return fn

        return decorator

    def entry(self, name: str) -> Entry:
        if name not in self._entries and name in self._builtins:
            importlib.import_module(self._builtins[name])
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.names())}") from None

    def get(self, name: str) -> Callable:
        return self.entry(name).factory

    def schema(self, name: str) -> Optional[type]:
        return self.entry(name).schema

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._builtins

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list:
        """Every known name, without importing anything."""
        return sorted(set(self._entries) | set(self._builtins))

    def find(self, key: str, value) -> Optional[Entry]:
        """The entry whose metadata has `key` == `value` (every built-in module imported first)."""
        self.load_all()
        return next((e for e in self._entries.values() if e.meta.get(key) == value), None)

    def load_all(self) -> None:
        """Import every built-in module (e.g. to read all entries' metadata)."""
        for module in sorted(set(self._builtins.values())):
            importlib.import_module(module)


_SAMPLER_MODULES = {
    "ddpm": "ddpm", "ddim": "ddim", "euler": "euler", "heun": "heun", "dpmpp-2m": "dpm_solver", "dpmpp-3m": "dpm_solver",
    "dpmpp-2m-sde": "dpm_solver", "dpm-singlestep": "dpm_solver", "unipc": "unipc", "euler-maruyama": "sde", "rk45": "rk45",
}

MODELS = Registry("model", {"dit": "genvis.models.dit", "linear_dit": "genvis.models.linear_dit", "var": "genvis.models.var",
                           "maskgit": "genvis.models.maskgit"})
TOKENIZERS = Registry("tokenizer", {"pixels": "genvis.tokenizers.base", "kl": "genvis.tokenizers.kl",
                                   "vq": "genvis.tokenizers.vq", "msvq": "genvis.tokenizers.multiscale_vq",
                                   "titok": "genvis.tokenizers.titok"})
TASKS = Registry("task", {"diffusion": "genvis.training.tasks.diffusion", "distill": "genvis.training.tasks.distill",
                         "tokenizer": "genvis.training.tasks.tokenizer", "tokens": "genvis.training.tasks.tokens"})
FAMILIES = Registry("model family", {"diffusion": "genvis.samplers.diffusion", "var": "genvis.samplers.tokens",
                                     "maskgit": "genvis.samplers.tokens"})
SAMPLERS = Registry("sampler", {name: f"genvis.samplers.{module}" for name, module in _SAMPLER_MODULES.items()})
DATASETS = Registry("dataset", {"digits": "genvis.data", "folder": "genvis.data", "latents": "genvis.data"})
