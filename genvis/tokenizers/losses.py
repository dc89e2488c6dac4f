"""Losses of a KL-VAE / VQ tokenizer trained the taming / LDM way (Esser et al. 2021, Rombach et al. 2022):
a pixel reconstruction term, a perceptual term, the KL of the posterior (KL-VAE), and a hinge PatchGAN
whose generator term is scaled by the adaptive weight, optionally with the LeCam regulariser
(Tseng et al. 2021, as in MAGVIT / MaskBit).

    rec = reconstruction_loss(x, x_rec) + perceptual(x, x_rec)       # [B]
    kl = kl_loss(mean, logvar)                                       # [B]
    g = hinge_g_loss(disc(x_rec))                                    # scalar
    w = disc_weight * adaptive_weight(rec.mean(), g, decoder_last_conv.weight)
    d = hinge_d_loss(disc(x.detach()), disc(x_rec.detach())) + lecam_weight * lecam.penalty(...)

Images are float NCHW in [-1, 1] throughout. Per-sample terms return [B] so the caller chooses the
reduction (and a result that does not depend on how the batch is split over processes); the GAN terms
return scalars, as taming's do. The weights, the discriminator's start step and the learned log-variance
of LDM's nll are the caller's (the training task's).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from genvis.errors import GenvisError
from genvis.io import load_checkpoint_file

PathLike = Union[str, Path]

# The digits classifier's weights, shipped with genvis.evaluation. Read as a file, not imported: evaluation
# (layer 5) sits above tokenizers (layer 2), so DigitsPerceptual rebuilds the classifier's conv stack here.
DIGITS_CLASSIFIER_PATH = Path(__file__).resolve().parents[1] / "evaluation" / "assets" / "digits_classifier.safetensors"
DIGITS_RESOLUTION = 16  # the classifier's input side

PERCEPTUAL_KINDS = ("auto", "lpips", "digits", "none")


# ----------------------------------------------------------------------------- pixel and KL terms

def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample pixel distance [B] of images x, x_rec [B, C, H, W] in [-1, 1]: the mean over C, H, W
    of |x - x_rec| (kind "l1", taming / LDM) or (x - x_rec)^2 (kind "l2")."""
    if x.shape != x_rec.shape:
        raise GenvisError(f"reconstruction of shape {tuple(x_rec.shape)}: expected the images' shape {tuple(x.shape)}")
    diff = x_rec - x
    if kind == "l1":
        per_pixel = diff.abs()
    elif kind == "l2":
        per_pixel = diff.square()
    else:
        raise GenvisError(f"reconstruction loss kind {kind!r}: expected 'l1' or 'l2'")
    return per_pixel.flatten(1).mean(dim=1)  # B


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL [B] of the diagonal Gaussian N(mean, exp(logvar)) to N(0, I), summed over all latent
    dims: 0.5 * sum(mean^2 + var - 1 - logvar), LDM's `DiagonalGaussianDistribution.kl()`.

    mean, logvar: [B, ...] (e.g. [B, C, h, w]), as the posterior holds them (LDM and diffusers clamp
    logvar to [-30, 20] when they build it; this function does not clamp).
    """
    if mean.shape != logvar.shape:
        raise GenvisError(f"logvar of shape {tuple(logvar.shape)}: expected the mean's shape {tuple(mean.shape)}")
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)  # B


# ----------------------------------------------------------------------------- PatchGAN discriminator

class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator (the pix2pix PatchGAN): a map of real/fake logits, one per patch.

        conv4x4/2(ndf) LReLU                                           (no norm on the first layer)
        n_layers - 1 x [conv4x4/2(ndf * min(2^n, 8)) norm LReLU]
        conv4x4/1(ndf * min(2^n_layers, 8)) norm LReLU
        conv4x4/1(1)                                                    -> logits [B, 1, h, w]

    all with padding 1 and LeakyReLU(0.2), in `main` with taming's indices, so a taming discriminator
    checkpoint loads into norm="batch". The norm defaults to GroupNorm(min(32, C), C): BatchNorm's batch
    statistics make the logits of one image depend on the rest of its batch, hence on how many processes
    split the batch; GroupNorm works per image. Convs before a norm have no bias (the norm's shift is one).
    Weight init is taming's `weights_init`: conv weights N(0, 0.02), norm weights N(1, 0.02) and biases 0;
    conv biases keep PyTorch's default, as in taming.

    Map size: each stride-2 conv takes H to floor(H / 2), each stride-1 conv to H - 1, so
    h = floor(H / 2^n_layers) - 2 (iterated floors). 256 -> 30 (n_layers 3); 32 -> 2 (n_layers 3);
    16x16 inputs get NO map with n_layers=3 (16 -> 2 -> 0): use n_layers=2 (2x2 map) or 1 (6x6).
    `forward` raises a GenvisError naming the largest n_layers that fits instead of running into torch's
    convolution error.

    Args:
        in_channels: image channels (default 3).
        ndf: channels of the first conv (default 64); with norm="group", every normed width
            ndf * min(2^n, 8) above 32 must be a multiple of 32.
        n_layers: stride-2 convs (default 3, taming's); at least 1.
        norm: "group" (default), "batch" (taming's; not per-sample) or "none".
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in ("group", "batch", "none"):
            raise GenvisError(f"discriminator norm {norm!r}: expected 'group', 'batch' or 'none'")
        if n_layers < 1:
            raise GenvisError(f"discriminator n_layers {n_layers}: expected at least 1")
        self.n_layers = n_layers
        self.norm = norm
        widths = [ndf * min(2 ** n, 8) for n in range(n_layers + 1)]  # ndf, 2 ndf, 4 ndf, 8 ndf, 8 ndf, ...
        layers: List[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1  # the last normed conv keeps the size (less 1)
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=norm == "none"),
                       self._norm(widths[n], ndf), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.initialize_weights()

    def _norm(self, channels: int, ndf: int) -> nn.Module:
        if self.norm == "batch":
            return nn.BatchNorm2d(channels)
        if self.norm == "none":
            return nn.Identity()
        groups = min(32, channels)
        if channels % groups:
            raise GenvisError(f"discriminator ndf {ndf}: a normed width of {channels} channels is not a multiple of "
                              f"{groups} (GroupNorm groups); expected every normed width ndf * 2^n above 32 to be a multiple of "
                              "32 (e.g. ndf a multiple of 16)")
        return nn.GroupNorm(groups, channels)

    def initialize_weights(self) -> None:
        """taming's weights_init: conv weights N(0, 0.02); norm weights N(1, 0.02), norm biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the logit map for [*, *, height, width] inputs; 0 or less: no map."""

        def side(s: int) -> int:
            for _ in range(self.n_layers):
                s //= 2  # conv 4x4, stride 2, padding 1
            return s - 2  # two convs 4x4, stride 1, padding 1

        return side(height), side(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_channels, H, W] in [-1, 1] -> patch logits [B, 1, h, w] (see the class docstring for h, w)."""
        B, C, H, W = x.shape
        h, w = self.output_size(H, W)
        if h < 1 or w < 1:
            fits = max((n for n in range(1, 12) if min(H, W) // 2 ** n >= 3), default=0)
            hint = f"n_layers <= {fits}" if fits else "inputs of at least 6x6"
            raise GenvisError(f"discriminator input {H}x{W}: n_layers={self.n_layers} leaves no patch map; "
                              f"expected {hint} for this size")
        return self.main(x)


# ----------------------------------------------------------------------------- GAN losses and weights

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (scalar), taming's: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))),
    means over every logit of the patch maps [B, 1, h, w] (any shapes)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator (decoder) hinge loss (scalar): -mean(logits_fake) over every logit."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """taming's calculate_adaptive_weight without its disc_weight factor (the caller multiplies):

        ||d rec_loss / d W|| / (||d gan_loss / d W|| + 1e-4), clamped to [0, max_weight], detached,

    W = `last_layer`, the decoder's last conv weight (a leaf that requires grad). rec_loss and gan_loss are
    scalars still attached to the graph (the reconstruction / nll term and hinge_g_loss); the gradients
    are taken with retain_graph=True so the caller can still backpropagate the total. `reduce` (e.g. a
    mean over processes) is applied to both gradients before their norms, so that under data
    parallelism the weight is the global batch's and every process uses the same one.
    Returns a 0-dim tensor on W's device.
    """
    if not last_layer.requires_grad:
        raise GenvisError("adaptive_weight: last_layer does not require grad; expected the decoder's last conv "
                          "weight in training (taming sets the weight to 0 in eval)")
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    if reduce is not None:
        rec_grad, gan_grad = reduce(rec_grad), reduce(gan_grad)
    weight = torch.linalg.vector_norm(rec_grad) / (torch.linalg.vector_norm(gan_grad) + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regularisation of the discriminator (Tseng et al. 2021, "Regularizing Generative Adversarial
    Networks under Limited Data"), as MAGVIT / MaskBit use it:

        penalty = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)

    with ema_real / ema_fake exponential moving averages of the mean real / fake logit (start 0, decay
    0.999). They are buffers, so they are checkpointed with the discriminator when this module is one
    of its (or the task's) submodules. The EMA follows the logits `update` is given: under data
    parallelism give it the logits gathered from every process, so all processes hold the same buffers.
    """

    def __init__(self, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise GenvisError(f"LeCam decay {decay}: expected a value in [0, 1)")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """ema <- decay * ema + (1 - decay) * mean(logits), for the real and the fake logits (any shapes)."""
        self.ema_real.lerp_(logits_real.detach().float().mean().to(self.ema_real), 1.0 - self.decay)
        self.ema_fake.lerp_(logits_fake.detach().float().mean().to(self.ema_fake), 1.0 - self.decay)

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The scalar LeCam penalty of the current logits against the EMAs (differentiable in the logits)."""
        ema_real = self.ema_real.to(logits_fake.dtype)
        ema_fake = self.ema_fake.to(logits_real.dtype)
        return F.relu(logits_real - ema_fake).square().mean() + F.relu(ema_real - logits_fake).square().mean()

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


# ----------------------------------------------------------------------------- perceptual terms

def _unit_normalize(feat_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Each feature vector over channels divided by its norm (+ eps), lpips's normalize_tensor. The norm is
    vector_norm rather than sqrt(sum(x^2)): the same value, but a finite gradient at an all-zero vector
    (where sqrt's is NaN; after a ReLU that finite gradient is then masked to 0)."""
    return feat_BCHW / (torch.linalg.vector_norm(feat_BCHW, dim=1, keepdim=True) + eps)


def _read_state_dict(path: Path, what: str, expected: str) -> Dict[str, torch.Tensor]:
    """A tensors-only state dict (genvis.io.load_checkpoint_file: safetensors, or torch.load with
    weights_only=True), or a one-line GenvisError naming the file and `expected`."""
    if not path.is_file():
        raise GenvisError(f"{path}: {what} not found; expected {expected}")
    state = load_checkpoint_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GenvisError(f"{path}: holds a {type(state).__name__}, not a state dict; expected {expected}")
    return state


def _take(state: Dict[str, torch.Tensor], key: str, shape: Tuple[int, ...], path: Path, expected: str) -> torch.Tensor:
    """state[key] as float32, checked against `shape`, or a one-line GenvisError naming the key."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        raise GenvisError(f"{path}: key '{key}' missing; expected {expected}")
    if tuple(value.shape) != tuple(shape):
        raise GenvisError(f"{path}: key '{key}' has shape {tuple(value.shape)}; expected {tuple(shape)} ({expected})")
    return value.detach().float().contiguous()


class _FrozenPerceptual(nn.Module):
    """A fixed network: no trainable parameters, always in eval mode (train() is a no-op)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)


def digits_conv() -> nn.Sequential:
    """The conv stack of genvis's digits classifier (genvis.evaluation.digits.DigitsClassifier builds its `conv`
    with this function; it lives here because tokenizers sit below evaluation in the layers)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 16 -> 8
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),  # 8 -> 4
    )


def load_digits_conv(path: Optional[PathLike] = None) -> nn.Sequential:
    """`digits_conv()` with the classifier's `conv.*` tensors from `path` (default: the shipped
    genvis/evaluation/assets/digits_classifier.safetensors), read as a file."""
    path = Path(path) if path is not None else DIGITS_CLASSIFIER_PATH
    conv = digits_conv()
    expected = "genvis's digits classifier weights (conv.N.weight/bias of DigitsClassifier)"
    state = _read_state_dict(path, "digits classifier weights", expected)
    with torch.no_grad():
        for key, param in conv.state_dict(prefix="conv.", keep_vars=True).items():
            param.copy_(_take(state, key, param.shape, path, expected))
    return conv


def digits_input(x: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) as the digits classifier sees them: grey (the channel mean),
    16x16 (bilinear, antialiased, as its prepare_images), float32; differentiable."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise GenvisError(f"images of shape {tuple(x.shape)}: expected [B, C, H, W] with C = 1 or 3")
    h = x.float().mean(dim=1, keepdim=True)
    if h.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
        h = F.interpolate(h, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="bilinear", antialias=True,
                          align_corners=False)
    return h


class DigitsPerceptual(_FrozenPerceptual):
    """An LPIPS-like distance in the feature space of genvis's digits classifier (no learned heads):

        d(x, y) = sum over the 4 ReLU outputs l of mean over h, w of || n(f_l(x)) - n(f_l(y)) ||^2

    n unit-normalising each feature vector over channels. Images are grey-scaled by the channel mean and
    resized to 16x16 (bilinear, antialiased, as the classifier's prepare_images does), differentiably.
    The conv weights are the classifier's `conv.*` tensors from `path` (default: the shipped
    genvis/evaluation/assets/digits_classifier.safetensors), read as a file (see DIGITS_CLASSIFIER_PATH).
    Meant for the digits data; it is the offline default when no VGG16 weights are at hand.
    """

    RELUS = (1, 3, 6, 8)  # indices in `conv` of the ReLUs whose outputs are compared

    def __init__(self, path: Optional[PathLike] = None):
        super().__init__()
        self.conv = load_digits_conv(path)
        self._freeze()

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """x, x_rec [B, C, H, W] in [-1, 1], C = 1 or 3 -> distance [B] (differentiable in both)."""
        if x.shape != x_rec.shape:
            raise GenvisError(f"reconstruction of shape {tuple(x_rec.shape)}: expected the images' shape {tuple(x.shape)}")
        B = x.shape[0]
        h = digits_input(torch.cat([x, x_rec]))  # 2B, 1, 16, 16
        total = h.new_zeros(B)
        for i, layer in enumerate(self.conv[: self.RELUS[-1] + 1]):
            h = layer(h)
            if i in self.RELUS:
                f = _unit_normalize(h)
                total = total + (f[:B] - f[B:]).square().sum(dim=1).mean(dim=(1, 2))  # B
        return total


# torchvision's vgg16 `features` up to relu5_3 (indices 0..29): ints are 3x3 convs + ReLU, "M" max pools.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_VGG_EXPECTED = "a torchvision vgg16 state dict (features.N.weight/bias; torch.save or .safetensors)"
LPIPS_HEADS_EXPECTED = "lpips v0.1 linear heads in the lpips package's layout (lin0..lin4.model.1.weight, weights/v0.1/vgg.pth)"


def lpips_package_heads() -> Optional[Path]:
    """The linear heads the `lpips` package ships (weights/v0.1/vgg.pth), or None when it is not installed.
    Found without importing the package."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


class LPIPS(_FrozenPerceptual):
    """VGG16 LPIPS v0.1 (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
    Metric"), as the `lpips` package computes it with net="vgg":

        d(x, y) = sum over l of mean over h, w of w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2

    s the scaling layer ((x - shift) / scale, shift [-.030, -.088, -.188], scale [.458, .448, .450]),
    f_l torchvision's vgg16 `features` at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, n unit
    normalisation over channels, w_l the five 1x1 linear heads (no bias).

    Nothing is downloaded. Args:
        weights: a local torchvision vgg16 state dict (torch.save / .pth read with weights_only, or
            .safetensors); keys other than features.0-28 (the classifier) are ignored.
        heads: a local file of the linear heads in the lpips package's layout; default: the file the
            installed `lpips` package ships (weights/v0.1/vgg.pth).
    """

    def __init__(self, weights: PathLike, heads: Optional[PathLike] = None):
        super().__init__()
        self.weights_path = Path(weights)
        vgg = _read_state_dict(self.weights_path, "VGG16 weights", LPIPS_VGG_EXPECTED)  # the file the user named first
        if heads is None:
            heads = lpips_package_heads()
            if heads is None:
                raise GenvisError("LPIPS linear heads: the lpips package is not installed and no heads file was "
                                  f"given; expected `pip install lpips` or heads=<{LPIPS_HEADS_EXPECTED}>")
        self.heads_path = Path(heads)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

        layers: List[nn.Module] = []
        in_channels = 3
        for v in _VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.ReLU()]
                in_channels = v
        with torch.device("meta"):  # the weights come from the file: skip 14.7M random inits
            self.features = nn.Sequential(*layers)
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)

        self.features.load_state_dict(
            {key: _take(vgg, f"features.{key}", value.shape, self.weights_path, LPIPS_VGG_EXPECTED)
             for key, value in self.features.state_dict().items()}, assign=True)
        lin = _read_state_dict(self.heads_path, "LPIPS linear heads", LPIPS_HEADS_EXPECTED)
        self.lins.load_state_dict(
            {f"{k}.weight": _take(lin, f"lin{k}.model.1.weight", (1, c, 1, 1), self.heads_path, LPIPS_HEADS_EXPECTED)
             for k, c in enumerate(_LPIPS_CHANNELS)}, assign=True)
        self._freeze()

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """x, x_rec [B, C, H, W] in [-1, 1], C = 3 (or 1: repeated to RGB), H, W >= 16 -> distance [B]."""
        if x.shape != x_rec.shape:
            raise GenvisError(f"reconstruction of shape {tuple(x_rec.shape)}: expected the images' shape {tuple(x.shape)}")
        if x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[-2:]) < 16:
            raise GenvisError(f"images of shape {tuple(x.shape)}: expected [B, C, H, W] with C = 1 or 3 and H, W >= 16 "
                              "(VGG16 pools 4 times before relu5_3)")
        B = x.shape[0]
        h = torch.cat([x, x_rec]).expand(-1, 3, -1, -1)  # 2B, 3, H, W (grey repeated to RGB)
        h = (h - self.shift.to(h.dtype)) / self.scale.to(h.dtype)
        total = 0.0
        taps = iter(zip(_LPIPS_TAPS, self.lins))
        tap, lin = next(taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i == tap:
                f = _unit_normalize(h)
                total = total + lin((f[:B] - f[B:]).square()).mean(dim=(1, 2, 3))  # B
                tap, lin = next(taps, (None, None))
        return total


#################################################################################
#        VA-VAE: aligning the latents with a frozen vision foundation model      #
#################################################################################

ALIGN_FEATURES = ("digits", "dinov2")


def alignment_loss(z: torch.Tensor, feat: torch.Tensor, distmat_margin: float = 0.25, cos_margin: float = 0.5,
                   distmat_weight: float = 1.0, cos_weight: float = 1.0) -> torch.Tensor:
    """VA-VAE's vision-foundation alignment (Yao et al. 2025, hustvl/LightningDiT vavae): z, feat [B, C, h, w]
    (z already projected to the features' width).

        marginal distance-matrix similarity: mean over b, i, j of relu(|cos(z_i, z_j) - cos(f_i, f_j)| - m1)
        marginal cosine similarity:          mean over b, i    of relu(1 - m2 - cos(z_i, f_i))

    cosines over channels between positions i, j of one image; returns distmat_weight * the first + cos_weight *
    the second (a scalar)."""
    zn, fn = F.normalize(z.flatten(2), dim=1), F.normalize(feat.flatten(2), dim=1)  # B, C, hw
    diff = (zn.transpose(1, 2) @ zn - fn.transpose(1, 2) @ fn).abs()  # B, hw, hw
    distmat = F.relu(diff - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - F.cosine_similarity(feat, z, dim=1)).mean()
    return distmat_weight * distmat + cos_weight * cos


class DigitsFeatures(_FrozenPerceptual):
    """The digits classifier's first block (two 3x3 convs + ReLU, 2x2 max pool): [B, 32, 8, 8] feature maps of
    16x16 digits, the frozen "foundation model" of the digits VA-VAE."""

    dim = 32

    def __init__(self, path: Optional[PathLike] = None):
        super().__init__()
        self.conv = load_digits_conv(path)[:5]
        self._freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(digits_input(x))


class FoundationAlignment(nn.Module):
    """VA-VAE's alignment term: a trainable 1x1 projection (no bias; VA-VAE's reverse_proj) takes the latents
    [B, c, h, w] to the frozen features' width; the features are resized (bilinear) to h x w when they differ;
    forward(images, z) -> `alignment_loss` (a scalar). Only the projection trains; it is not exported.
    features: "digits" (the digits classifier's first block; `path` overrides the shipped weights) or "dinov2"
    (genvis.tokenizers.dinov2 from the local weights file `path`, VA-VAE's ImageNet choice)."""

    def __init__(self, latent_channels: int, features: str = "digits", path: Optional[PathLike] = None, **margins):
        super().__init__()
        if features not in ALIGN_FEATURES:
            raise GenvisError(f"alignment features {features!r}: expected one of {', '.join(ALIGN_FEATURES)}")
        if features == "dinov2":
            from genvis.tokenizers.dinov2 import load_dinov2

            if path is None:
                raise GenvisError("alignment features 'dinov2' need a local DINOv2 weights file (task.align_weights: "
                                  "e.g. timm's vit_large_patch14_dinov2.lvd142m as .safetensors); nothing downloads one")
            self.features = load_dinov2(path)
        else:
            self.features = DigitsFeatures(path)
        self.proj = nn.Conv2d(latent_channels, self.features.dim, 1, bias=False)
        self.margins = margins

    def forward(self, images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feat = self.features(images)
        if feat.shape[-2:] != z.shape[-2:]:
            feat = F.interpolate(feat, size=z.shape[-2:], mode="bilinear", align_corners=False)
        return alignment_loss(self.proj(z.float()), feat, **self.margins)


def build_perceptual(kind: str = "auto", weights: Optional[PathLike] = None,
                     heads: Optional[PathLike] = None) -> Tuple[Optional[nn.Module], str]:
    """(perceptual module or None, a description for the run log) of a perceptual-loss choice:

        "lpips"   LPIPS(weights, heads): VGG16 from the local file `weights` (required)
        "digits"  DigitsPerceptual(): the shipped digits classifier
        "none"    no perceptual term
        "auto"    "lpips" when `weights` is given and exists, else "digits"
    """
    if kind not in PERCEPTUAL_KINDS:
        raise GenvisError(f"perceptual loss {kind!r}: expected one of {', '.join(PERCEPTUAL_KINDS)}")
    if kind == "auto":
        if weights is not None and Path(weights).is_file():
            kind = "lpips"
        else:
            module, description = build_perceptual("digits")
            if weights is not None:  # a mistyped path should not go unnoticed in the log
                description += f" (no VGG16 weights at {weights})"
            return module, description
    if kind == "none":
        return None, "none"
    if kind == "digits":
        return DigitsPerceptual(), "digits-classifier feature distance"
    if weights is None:
        raise GenvisError(f"perceptual loss 'lpips' needs VGG16 weights: expected weights=<{LPIPS_VGG_EXPECTED}>")
    return LPIPS(weights, heads), f"LPIPS (VGG16 from {weights})"


__all__ = [
    "reconstruction_loss", "kl_loss", "PatchDiscriminator", "hinge_d_loss", "hinge_g_loss", "adaptive_weight",
    "LeCam", "DigitsPerceptual", "LPIPS", "lpips_package_heads", "build_perceptual", "alignment_loss",
    "FoundationAlignment",
]
