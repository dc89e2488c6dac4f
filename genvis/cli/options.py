"""Parsing of repeated `KEY=VALUE` command-line options (sampler and grid options)."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, 'none' -> None, '{...}' / '[...]' -> JSON
    (e.g. scheduler_kwargs={"solver_order": 3}), anything else stays a string."""
    low = text.strip().lower()
    if low[:1] in ("{", "["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: not valid JSON ({err})") from None
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_pairs(items: Optional[List[str]], flag: str) -> Dict[str, object]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{flag} {item!r}: expected KEY=VALUE, e.g. order=3")
        out[key.strip()] = parse_value(value)
    return out
