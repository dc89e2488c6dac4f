"""Feature extractors for FID/IS/KID/precision-recall, and streaming feature statistics.

    extractor = build_extractor("digits")                        # offline, the shipped classifier
    extractor = build_extractor("inception", weights="pt.pth")   # torch-fidelity's Inception-v3
    acc = extract(extractor, source.batches(64), keep=("penultimate",))
    mu, sigma = acc.mu_sigma("penultimate")

Extractors follow torch-fidelity's convention: input uint8 [B, 3, H, W], output a tuple of
float32 [B, D] tensors, one per requested feature. The digits classifier is registered with
torch-fidelity as "genvis-digits", so `torch_fidelity.calculate_metrics(...,
feature_extractor="genvis-digits")` sees exactly the features genvis uses.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from genvis.errors import GenvisError
from genvis.evaluation import FEATURE_SETS
from genvis.evaluation.digits import load_digits_classifier, prepare_images

DIGITS_NAME = "genvis-digits"
INCEPTION_NAME = "inception-v3-compat"

# Per feature set: the layer used for fid/kid/prc and the one used for isc.
STATS_LAYER = {"inception": "2048", "digits": "penultimate"}
LOGITS_LAYER = {"inception": "logits_unbiased", "digits": "logits_unbiased"}


class DigitsFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """genvis's digits classifier as a torch-fidelity feature extractor.

    Features:
        "penultimate": the 128-d ReLU features `genvis.evaluation.digits` computes FDs on;
        "logits_unbiased": the head without its bias, [B, 10] (used for the Inception Score).

    Images go through `genvis.evaluation.digits.prepare_images` (grey by channel mean, resized to
    16x16 with antialiased bilinear interpolation), so features equal digits_metrics's.

    Args:
        name: the registered name ("genvis-digits").
        features_list: requested feature names, a subset of `get_provided_features_list()`.
        feature_extractor_weights_path: classifier safetensors (default: the shipped asset).
        **kwargs: other torch-fidelity keyword arguments (ignored).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.classifier = load_digits_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 16, 16]) * 255).to(torch.uint8)

    def forward(self, x):
        """uint8 [B, 3, H, W] -> tuple of float32 features, in the order of `features_list`."""
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise GenvisError(f"digits extractor input {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}: "
                              "expected uint8 [B, 3, H, W]")
        device = self.classifier.fc.weight.device
        h = prepare_images(x.to(device).float() / 127.5 - 1.0)  # the same preprocessing as digits_metrics
        feats = self.classifier.features(h)
        out = {"penultimate": feats}
        if "logits_unbiased" in self.features_list:
            out["logits_unbiased"] = feats @ self.classifier.head.weight.T
        return tuple(out[name] for name in self.features_list)


if DIGITS_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # importlib.reload or a second import path
    torch_fidelity.register_feature_extractor(DIGITS_NAME, DigitsFeatureExtractor)


def inception_hub_file() -> Path:
    """Where torch-fidelity's Inception download is cached: torch.hub.get_dir()/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def load_weights_file(path: Union[str, Path]) -> dict:
    """The state dict in `path`, read with `torch.load(weights_only=True)` (tensors only, never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise GenvisError(f"{path}: weights file not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
        first = first.split(". ")[0].rstrip(". ")  # torch's message goes on with advice on how to unpickle
        raise GenvisError(f"{path}: not a tensors-only weights file (torch.load with weights_only=True "
                          f"refused it: {first}); genvis does not unpickle weights") from None
    if not isinstance(state_dict, dict):
        raise GenvisError(f"{path}: expected a state dict (name -> tensor), got {type(state_dict).__name__}")
    return state_dict


class _InceptionFromStateDict(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 with its weights given as a state dict that genvis read with
    weights_only=True: torch-fidelity's own loader unpickles its file (weights_only=False), so it is
    handed an empty tensors-only file, whose load this class skips, and the real weights follow."""

    _skip_load = False

    def __init__(self, name, features_list, state_dict):
        with tempfile.TemporaryDirectory() as tmp:
            empty = Path(tmp) / "empty.pt"
            torch.save({}, empty)
            type(self)._skip_load = True
            try:
                super().__init__(name, features_list, feature_extractor_weights_path=str(empty), verbose=False)
            finally:
                type(self)._skip_load = False
        self.load_state_dict(state_dict)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if type(self)._skip_load:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_feature_set(features: str) -> str:
    """`features` must be one of FEATURE_SETS."""
    if features not in FEATURE_SETS:
        raise GenvisError(f"features {features!r}: expected one of {', '.join(FEATURE_SETS)}")
    return features


def build_extractor(name: str, weights: Optional[Union[str, Path]] = None, device="cpu",
                    features: Optional[Sequence[str]] = None) -> torch_fidelity.FeatureExtractorBase:
    """A torch-fidelity feature extractor in eval mode on `device`.

    Args:
        name: "digits" (genvis's classifier; features "penultimate", "logits_unbiased") or
            "inception" (torch-fidelity's "inception-v3-compat"; features "2048", "logits_unbiased").
        weights: a weights file. For inception: a tensors-only state dict (read once, with
            weights_only=True); without it the file torch-fidelity would download must already be in
            the torch hub cache, which is read the same way; nothing is ever downloaded.
            For digits: a classifier safetensors file (default: the shipped one).
        device: torch device for the extractor.
        features: requested feature names (default: both of the set's features).
    """
    check_feature_set(name)
    features = list(features) if features is not None else [STATS_LAYER[name], LOGITS_LAYER[name]]
    if name == "digits":
        if weights is not None and not Path(weights).is_file():
            raise GenvisError(f"{weights}: digits classifier weights not found")
        provided = DigitsFeatureExtractor.get_provided_features_list()
    else:
        provided = FeatureExtractorInceptionV3.get_provided_features_list()
    unknown = [f for f in features if f not in provided]
    if unknown or not features:
        raise GenvisError(f"{name} features {unknown or features}: expected names from {', '.join(provided)}")
    if name == "digits":
        extractor = DigitsFeatureExtractor(DIGITS_NAME, features, feature_extractor_weights_path=weights)
    else:
        if weights is None:
            weights = inception_hub_file()
            if not weights.is_file():
                raise GenvisError(f"Inception-v3 weights needed: {weights.name} (from {URL_INCEPTION_V3}) is not in "
                                  f"{weights.parent} and genvis never downloads; pass --inception-weights FILE")
        try:
            extractor = _InceptionFromStateDict(INCEPTION_NAME, features, load_weights_file(weights))
        except RuntimeError as err:  # load_state_dict: missing/unexpected keys or shapes
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise GenvisError(f"{weights}: not Inception-v3 weights for torch-fidelity ({first})") from None
    return extractor.to(device).eval()


class FeatureAccumulator:
    """Streaming float64 statistics of features, memory bounded by D^2 per feature, not by N.

    Per feature: the count, the running mean, and the sum of centred outer products, merged batch by
    batch with Chan et al.'s pairwise update (no cancellation from sum(x x^T) - n mu mu^T). Features
    named in `keep` are also stored (float32, CPU) for metrics that need every sample (KID, PRC, IS).

    Args:
        stats: feature names to accumulate mean/covariance for.
        keep: feature names to store in full.
    """

    def __init__(self, stats: Sequence[str] = (), keep: Sequence[str] = ()):
        self.stats_names = tuple(stats)
        self.keep_names = tuple(keep)
        self._mean: Dict[str, Optional[np.ndarray]] = {name: None for name in self.stats_names}
        self._m2: Dict[str, Optional[np.ndarray]] = {name: None for name in self.stats_names}
        self._kept: Dict[str, list] = {name: [] for name in self.keep_names}
        self.num = 0

    @property
    def names(self) -> Tuple[str, ...]:
        """Every feature this accumulator needs (stats and kept), without repeats."""
        return tuple(dict.fromkeys(self.stats_names + self.keep_names))

    def update(self, features: Dict[str, torch.Tensor]) -> None:
        """Add one batch: `features[name]` is [B, D] for every name in `names`."""
        sizes = {int(features[name].shape[0]) for name in self.names}
        if len(sizes) != 1:
            raise GenvisError(f"feature batch sizes differ: {sorted(sizes)}")
        for name in self.stats_names:
            x = features[name].detach().to("cpu", torch.float64).numpy()
            n_b = x.shape[0]
            if n_b == 0:
                continue
            mean_b = x.mean(axis=0)
            centred = x - mean_b
            m2_b = centred.T @ centred
            n_a = self.num  # every feature gets every batch, so all counts equal num
            if n_a == 0:
                self._mean[name], self._m2[name] = mean_b, m2_b
            else:
                if mean_b.shape != self._mean[name].shape:
                    raise GenvisError(f"feature {name!r} of dim {mean_b.shape[0]}: earlier batches had {self._mean[name].shape[0]}")
                n = n_a + n_b
                delta = mean_b - self._mean[name]
                self._mean[name] = self._mean[name] + delta * (n_b / n)
                self._m2[name] = self._m2[name] + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        for name in self.keep_names:
            self._kept[name].append(features[name].detach().to("cpu", torch.float32))
        self.num += sizes.pop()

    def mu_sigma(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """float64 mean [D] and unbiased covariance [D, D] (as np.cov, ddof=1) of feature `name`."""
        if name not in self.stats_names:
            raise GenvisError(f"feature {name!r}: no statistics accumulated (have: {', '.join(self.stats_names) or 'none'})")
        n = self.num
        if n < 2:
            raise GenvisError(f"feature {name!r}: {n} sample(s); mean and covariance need at least 2")
        return self._mean[name].copy(), self._m2[name] / (n - 1)

    def kept(self, name: str) -> torch.Tensor:
        """All stored features `name`, float32 [N, D]."""
        if name not in self.keep_names:
            raise GenvisError(f"feature {name!r}: not kept (kept: {', '.join(self.keep_names) or 'none'})")
        parts = self._kept[name]
        if len(parts) > 1:  # concatenate once and keep the result
            self._kept[name] = parts = [torch.cat(parts)]
        return parts[0] if parts else torch.empty(0, 0)


def extract(extractor, batches: Iterable[torch.Tensor], accumulator: Optional[FeatureAccumulator] = None,
            *, stats: Sequence[str] = (), keep: Sequence[str] = ()) -> FeatureAccumulator:
    """Run `extractor` over uint8 [B, 3, H, W] batches under torch.no_grad, feeding an accumulator.

    Args:
        extractor: a torch-fidelity FeatureExtractorBase; every accumulated feature must be in its
            `features_list`.
        batches: iterable of uint8 [B, 3, H, W] tensors.
        accumulator: where to add the features; a new FeatureAccumulator(stats, keep) when None
            (default stats: every feature the extractor produces).

    Returns:
        The accumulator.
    """
    if accumulator is None:
        accumulator = FeatureAccumulator(stats=stats if (stats or keep) else extractor.features_list, keep=keep)
    missing = [name for name in accumulator.names if name not in extractor.features_list]
    if missing:
        raise GenvisError(f"features {missing}: the extractor only computes {list(extractor.features_list)}")
    device = next(extractor.parameters()).device
    with torch.no_grad():
        for batch in batches:
            out = extractor.convert_features_tuple_to_dict(extractor(batch.to(device)))
            accumulator.update(out)
    return accumulator
