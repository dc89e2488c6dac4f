"""Work split into shards that processes share and reruns resume, and the settings record that keeps
a rerun from mixing two settings in one output folder. Used by sharded sampling for evaluation
(genvis.evaluation.distributed) and latent extraction (genvis.tokenizers.extract).

Shard k holds the consecutive indices k * shard_size .. min((k + 1) * shard_size, num) - 1; process p of
W takes the shards with k % W == p. Results depend only on the indices, never on the process count.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from genvis.errors import GenvisError, first_line
from genvis.io import write_text_atomic


def shard_ranges(num: int, shard_size: int) -> List[Tuple[int, int, int]]:
    """(k, start, stop) for every shard of `num` consecutive indices."""
    return [(k, start, min(start + shard_size, num)) for k, start in enumerate(range(0, num, shard_size))]


def flatten(tree: dict, prefix: str = "") -> Dict[str, object]:
    """{"train": {"steps": 3}} -> {"train.steps": 3} (lists stay values), so a difference names the exact key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def record_settings(path: Path, settings: Dict, is_main: bool, hint: str) -> None:
    """Write the settings record `path` (main process) for a new output folder, or check that the folder's
    record has the same settings: a difference is one GenvisError naming every differing key, ending in
    `hint`. Every process may call it, so that a refused rerun stops them all."""
    path = Path(path)
    if not path.is_file():
        if is_main:
            write_text_atomic(path, json.dumps(settings, indent=2, sort_keys=True))
        return
    try:
        old = flatten(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError) as err:
        raise GenvisError(f"{path}: not a readable settings record ({first_line(err)}); {hint}") from None
    new = flatten(settings)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise GenvisError(f"{path.parent}: made with other settings ({changes}); {hint}")
