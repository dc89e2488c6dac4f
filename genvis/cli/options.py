"""Parsing of repeated `KEY=VALUE` command-line options (sampler and grid options)."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, 'none' -> None, anything else stays a string."""
    low = text.strip().lower()
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
