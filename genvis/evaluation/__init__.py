"""Evaluation: Frechet distances on Inception or digits-classifier features.

Only the light, numpy-only pieces are imported here; `genvis.evaluation.digits` (torch, the
classifier weights) is imported by whoever needs it.
"""
from genvis.evaluation.fid import feature_statistics, frechet_distance

FEATURE_SETS = ("inception", "digits")  # feature spaces of `genvis eval fid` / `genvis ref`
METRICS = ("fid", "isc", "kid", "prc", "sfid")

__all__ = ["feature_statistics", "frechet_distance", "FEATURE_SETS", "METRICS"]
