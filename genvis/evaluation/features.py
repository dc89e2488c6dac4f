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

# Per feature set: the layer used for fid/kid/prc, the one used for isc, and the one used for sfid.
STATS_LAYER = {"inception": "2048", "digits": "penultimate"}
LOGITS_LAYER = {"inception": "logits_unbiased", "digits": "logits_unbiased"}
SPATIAL_LAYER = {"inception": "spatial", "digits": "spatial"}
SPATIAL_CHANNELS = 7  # ADM's evaluator: mixed_6/conv[..., :7]


def spatial_features(maps_NCHW: torch.Tensor) -> torch.Tensor:
    """The sFID features of ADM's evaluator from a feature map: its first 7 channels, flattened in
    NHWC order (h, w, c) as TensorFlow lays them out, so statistics match ADM's `mu_s`/`sigma_s`."""
    spatial = maps_NCHW[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return spatial.reshape(spatial.shape[0], -1).to(torch.float32)


class DigitsFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """genvis's digits classifier as a torch-fidelity feature extractor.

    Features:
        "penultimate": the 128-d ReLU features `genvis.evaluation.digits` computes FDs on;
        "logits_unbiased": the head without its bias, [B, 10] (used for the Inception Score);
        "spatial": the first 7 channels of the first block's pooled 8x8 maps, flattened NHWC, [B, 448]
            (the digits analogue of ADM's sFID features).

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
        return "penultimate", "logits_unbiased", "spatial"

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
        maps, feats = self.classifier.feature_maps(h)
        out = {"penultimate": feats}
        if "spatial" in self.features_list:
            out["spatial"] = spatial_features(maps)
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
        if state_dict is not None:  # None: keep the initialisation (write_synthetic_inception_weights)
            self.load_state_dict(state_dict)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if type(self)._skip_load:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list():
        return FeatureExtractorInceptionV3.get_provided_features_list() + ("spatial",)

    def forward(self, x):
        """torch-fidelity's features, plus "spatial": ADM's sFID features, the first 7 channels of
        mixed_6/conv (torch Mixed_6d's branch1x1, the first 192 channels of its output) at 17x17,
        flattened NHWC to 2023-d."""
        if "spatial" not in self.features_list:
            return super().forward(x)
        captured = {}
        handle = self.Mixed_6d.register_forward_hook(lambda module, args, output: captured.setdefault("maps", output))
        requested = self.features_list
        inner = [f for f in requested if f != "spatial"]
        if not any(f in ("768", "2048", "logits_unbiased", "logits") for f in inner):
            inner.append("768")  # the network must run past Mixed_6d (it stops after Mixed_6e for "768")
        try:
            self.features_list = inner
            out = dict(zip(inner, super().forward(x)))
        finally:
            self.features_list = requested
            handle.remove()
        out["spatial"] = spatial_features(captured["maps"])
        return tuple(out[name] for name in requested)


def check_feature_set(features: str) -> str:
    """`features` must be one of FEATURE_SETS."""
    if features not in FEATURE_SETS:
        raise GenvisError(f"features {features!r}: expected one of {', '.join(FEATURE_SETS)}")
    return features


def build_extractor(name: str, weights: Optional[Union[str, Path]] = None, device="cpu",
                    features: Optional[Sequence[str]] = None) -> torch_fidelity.FeatureExtractorBase:
    """A torch-fidelity feature extractor in eval mode on `device`.

    Args:
        name: "digits" (genvis's classifier; features "penultimate", "logits_unbiased", "spatial") or
            "inception" (torch-fidelity's "inception-v3-compat"; features "2048", "logits_unbiased", ...,
            and "spatial", ADM's sFID features).
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
        provided = _InceptionFromStateDict.get_provided_features_list()
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
    extractor = extractor.to(device).eval()
    if name == "inception":
        # NHWC convolutions: 1.3-1.5x faster through oneDNN/cuDNN; features equal to ~1e-6 relative
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


def write_synthetic_inception_weights(path: Union[str, Path], seed: int = 0) -> Path:
    """A tensors-only state dict in the layout of torch-fidelity's Inception-v3 weights, with random
    values, for offline tests and benchmarks (the real file cannot be downloaded here).

    Convolutions are He-normal (std sqrt(2 / fan_in)) and the classifier 1/sqrt(fan_in), so features
    stay O(0.1-1) through the 94 convolutions (PyTorch's default init shrinks them to ~1e-7, where any
    tolerance test passes trivially); batch-norm statistics keep their defaults. Throughput and code
    paths are those of the real weights; the feature values are not.
    """
    import math

    path = Path(path)
    layout = _InceptionFromStateDict(INCEPTION_NAME, ["2048"], None).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, value in layout.items():
        if value.dim() == 4 or key == "fc.weight":
            fan_in = value[0].numel()
            gain = 2.0 if value.dim() == 4 else 1.0
            value = torch.randn(value.shape, generator=generator) * math.sqrt(gain / fan_in)
        state_dict[key] = value.contiguous()
    torch.save(state_dict, path)
    return path


class FeatureAccumulator:
    """Streaming float64 statistics of features, memory bounded by D^2 per feature, not by N.

    Per feature: the count, the running mean, and the sum of centred outer products, merged chunk by
    chunk with Chan et al.'s pairwise update (no cancellation from sum(x x^T) - n mu mu^T). Batches are
    buffered until `chunk` rows have arrived, then merged with one float64 matmul: fewer, larger
    products. The arithmetic is torch's, on the extractor's threads; numpy's BLAS interleaved with
    torch ops makes the two thread pools spin against each other (3-4x slower on 2 cores).
    Features named in `keep` are also stored (float32, CPU) for metrics that need every sample
    (KID, PRC, IS).

    Args:
        stats: feature names to accumulate mean/covariance for.
        keep: feature names to store in full.
        chunk: rows buffered per statistics merge (memory chunk x D float64 per feature).
    """

    def __init__(self, stats: Sequence[str] = (), keep: Sequence[str] = (), chunk: int = 1024):
        self.stats_names = tuple(stats)
        self.keep_names = tuple(keep)
        self.chunk = int(chunk)
        self._mean: Dict[str, Optional[torch.Tensor]] = {name: None for name in self.stats_names}
        self._m2: Dict[str, Optional[torch.Tensor]] = {name: None for name in self.stats_names}
        self._pending: Dict[str, list] = {name: [] for name in self.stats_names}
        self._merged = 0  # rows already in _mean/_m2 (the same for every feature)
        self._kept: Dict[str, list] = {name: [] for name in self.keep_names}
        self.num = 0

    @property
    def names(self) -> Tuple[str, ...]:
        """Every feature this accumulator needs (stats and kept), without repeats."""
        return tuple(dict.fromkeys(self.stats_names + self.keep_names))

    def update(self, features: Dict[str, torch.Tensor]) -> None:
        """Add one batch: `features[name]` is [B, D] for every name in `names`."""
        missing = [name for name in self.names if name not in features]
        if missing:
            raise GenvisError(f"features {missing} missing from the batch (got: {', '.join(features) or 'none'})")
        sizes = {int(features[name].shape[0]) for name in self.names}
        if len(sizes) != 1:
            raise GenvisError(f"feature batch sizes differ: {sorted(sizes)}")
        for name in self.stats_names:  # every check before any change, so a refused batch leaves no trace
            x = features[name]
            dim = self._mean[name].shape[0] if self._mean[name] is not None else (
                self._pending[name][0].shape[1] if self._pending[name] else None)
            if x.dim() != 2 or (dim is not None and x.shape[1] != dim):
                raise GenvisError(f"feature {name!r} of shape {tuple(x.shape)}: expected [B, {dim or 'D'}]")
        for name in self.stats_names:
            self._pending[name].append(features[name].detach().to("cpu", torch.float64))
        for name in self.keep_names:
            self._kept[name].append(features[name].detach().to("cpu", torch.float32))
        self.num += sizes.pop()
        if self.num - self._merged >= self.chunk:
            self._merge()

    def _merge(self) -> None:
        """Fold the buffered rows into the running mean and centred sum of squares."""
        n_a, n_b = self._merged, self.num - self._merged
        if n_b == 0:
            return
        for name in self.stats_names:
            x = torch.cat(self._pending[name])
            self._pending[name] = []
            mean_b = x.mean(dim=0)
            centred = x - mean_b
            m2_b = centred.T @ centred
            if n_a == 0:
                self._mean[name], self._m2[name] = mean_b, m2_b
            else:
                n = n_a + n_b
                delta = mean_b - self._mean[name]
                self._mean[name] = self._mean[name] + delta * (n_b / n)
                self._m2[name] = self._m2[name] + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self._merged = self.num

    def mu_sigma(self, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """float64 mean [D] and unbiased covariance [D, D] (as np.cov, ddof=1) of feature `name`."""
        if name not in self.stats_names:
            raise GenvisError(f"feature {name!r}: no statistics accumulated (have: {', '.join(self.stats_names) or 'none'})")
        n = self.num
        if n < 2:
            raise GenvisError(f"feature {name!r}: {n} sample(s); mean and covariance need at least 2")
        self._merge()
        return self._mean[name].numpy().copy(), (self._m2[name] / (n - 1)).numpy()

    def kept(self, name: str) -> torch.Tensor:
        """All stored features `name`, float32 [N, D]."""
        if name not in self.keep_names:
            raise GenvisError(f"feature {name!r}: not kept (kept: {', '.join(self.keep_names) or 'none'})")
        parts = self._kept[name]
        if len(parts) > 1:  # concatenate once and keep the result
            self._kept[name] = parts = [torch.cat(parts)]
        return parts[0] if parts else torch.empty(0, 0)


def extract(extractor, batches: Iterable[torch.Tensor], accumulator: Optional[FeatureAccumulator] = None,
            *, stats: Sequence[str] = (), keep: Sequence[str] = (), progress: bool = False,
            total: Optional[int] = None, desc: str = "features") -> FeatureAccumulator:
    """Run `extractor` over uint8 [B, 3, H, W] batches under torch.no_grad, feeding an accumulator.

    Args:
        extractor: a torch-fidelity FeatureExtractorBase; every accumulated feature must be in its
            `features_list`.
        batches: iterable of uint8 [B, 3, H, W] tensors.
        accumulator: where to add the features; a new FeatureAccumulator(stats, keep) when None
            (default stats: every feature the extractor produces).
        progress: show a tqdm bar of images done on stderr (default False). It is shown only when
            stderr is a terminal, so logs and captured output get no carriage-return lines.
        total: the number of images the batches hold, for the bar (None: a count without a total).
        desc: the bar's label.

    Returns:
        The accumulator.
    """
    from tqdm.auto import tqdm

    if accumulator is None:
        accumulator = FeatureAccumulator(stats=stats if (stats or keep) else extractor.features_list, keep=keep)
    missing = [name for name in accumulator.names if name not in extractor.features_list]
    if missing:
        raise GenvisError(f"features {missing}: the extractor only computes {list(extractor.features_list)}")
    device = next(extractor.parameters()).device
    # disable=None: tqdm turns itself off when stderr is not a terminal
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True,
                               disable=None if progress else True) as bar:
        for batch in batches:
            out = extractor.convert_features_tuple_to_dict(extractor(batch.to(device)))
            accumulator.update(out)
            bar.update(int(batch.shape[0]))
    return accumulator
