"""Reconstruction quality of a tokenizer: PSNR, SSIM and rFD (a Frechet distance between the features of
the originals and of their reconstructions).

    tok = genvis.load_tokenizer("vae/")
    metrics = reconstruction_metrics(tok, cfg.data)                  # digits test split, digits features
    metrics = reconstruction_metrics(tok, cfg.data, features="inception", weights="pt_inception.pth",
                                     side_by_side="recon.png")       # + originals over reconstructions
    # {"psnr": 31.2, "ssim": 0.93, "rfd": 0.41, "num_images": 360, "features": "digits", "split": "test"}

SSIM is that of Wang et al. 2004 ("Image Quality Assessment: From Error Visibility to Structural
Similarity") with skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`
conventions; see `ssim`. rFD follows the rFID of the tokenizer literature (e.g. the LDM and MAR papers):
FID's formula on the reconstructions against the very images they reconstruct, rather than against a
reference set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from genvis.data import build_dataset
from genvis.errors import GenvisError
from genvis.evaluation.features import STATS_LAYER, FeatureAccumulator, build_extractor, check_feature_set, extract
from genvis.evaluation.fid import frechet_distance
from genvis.evaluation.reference import _to_nchw3  # the uint8 NHWC -> [N, 3, H, W] step of every dataset source
from genvis.generate import save_grid, to_uint8
from genvis.tokenizers import Tokenizer, load_tokenizer

# Wang et al. 2004, as skimage's gaussian_weights=True: sigma 1.5 truncated at 3.5 sigma -> an 11-tap window.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SIDE_BY_SIDE_MAX = 16  # images per row of the side-by-side grid


# --------------------------------------------------------------------------------------------------
# Per-image metrics
# --------------------------------------------------------------------------------------------------

def _unit_range(x: torch.Tensor, y: torch.Tensor, what: str):
    """Two [B, C, H, W] batches in [-1, 1] -> float64 on the [0, 1] scale."""
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise GenvisError(f"{what}: expected two torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or x.shape != y.shape:
        raise GenvisError(f"{what}: images of shapes {tuple(x.shape)} and {tuple(y.shape)}; expected two [B, C, H, W] "
                          "batches of one shape")
    return (x.double() + 1.0) / 2.0, (y.double() + 1.0) / 2.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image pair, in dB, on the [0, 1] scale (data range 1).

    Args:
        x, y: [B, C, H, W] images in [-1, 1] (any float dtype; computed in float64).

    Returns:
        float64 [B]: 10 log10(1 / mse), mse the mean over C, H, W of ((x - y) / 2)^2. An exact
        reconstruction (mse = 0) gives +inf; no cap is applied.
    """
    x01, y01 = _unit_range(x, y, "psnr")
    mse = (x01 - y01).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)  # 1 / 0 = inf -> +inf dB


def _gaussian_taps(device) -> torch.Tensor:
    """The normalised 1-D Gaussian window, float64 [11]: exp(-k^2 / (2 sigma^2)) for k = -5..5, divided by its sum
    (scipy.ndimage.gaussian_filter's taps for sigma 1.5, truncate 3.5, which skimage's SSIM uses)."""
    k = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    taps = torch.exp(-0.5 * (k / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image pair, on the [0, 1] scale (data range 1).

    Convention (that of skimage.metrics.structural_similarity(x, y, data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=0) per image):
      - local statistics are weighted by an 11 x 11 Gaussian window, sigma 1.5 (the separable product of
        the 11 taps exp(-k^2 / (2 * 1.5^2)), k = -5..5, normalised to sum 1);
      - mu_x, mu_y, and the population (weighted, not sample-corrected) moments
        s_xx = E[x^2] - mu_x^2, s_yy = E[y^2] - mu_y^2, s_xy = E[xy] - mu_x mu_y;
      - SSIM map = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_xx + s_yy + C2)),
        C1 = (0.01 * 1)^2, C2 = (0.03 * 1)^2;
      - the map is averaged over the 'valid' positions only: windows wholly inside the image, i.e. the
        (H - 10) x (W - 10) centre, as skimage crops the 5-pixel border that its reflect-padded filter touches;
      - colour images: the mean over channels of each channel's SSIM (each channel computed separately).

    Args:
        x, y: [B, C, H, W] images in [-1, 1], H and W >= 11 (any float dtype; computed in float64).

    Returns:
        float64 [B]. ssim(x, x) = 1 exactly.
    """
    x01, y01 = _unit_range(x, y, "ssim")
    B, C, H, W = x01.shape
    if H < SSIM_WINDOW or W < SSIM_WINDOW:
        raise GenvisError(f"ssim: images of {H}x{W}; the {SSIM_WINDOW}x{SSIM_WINDOW} Gaussian window needs at least "
                          f"{SSIM_WINDOW}x{SSIM_WINDOW}")
    taps = _gaussian_taps(x01.device)
    rows, cols = taps.view(1, 1, SSIM_WINDOW, 1), taps.view(1, 1, 1, SSIM_WINDOW)

    def window_mean(z: torch.Tensor) -> torch.Tensor:
        # separable 'valid' Gaussian filter of every channel: [B*C*5, 1, H, W] -> [B*C*5, 1, H-10, W-10]
        return F.conv2d(F.conv2d(z, rows), cols)

    a, b = x01.reshape(B * C, 1, H, W), y01.reshape(B * C, 1, H, W)
    stacked = torch.cat([a, b, a * a, b * b, a * b])  # 5 B*C, 1, H, W: one filter call for all moments
    mu_x, mu_y, e_xx, e_yy, e_xy = window_mean(stacked).chunk(5)
    s_xx, s_yy, s_xy = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * s_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (s_xx + s_yy + c2))
    # per channel: mean over the valid map; per image: mean over channels (equal valid maps -> one mean)
    return ssim_map.reshape(B, C, -1).mean(dim=2).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# A tokenizer on a dataset
# --------------------------------------------------------------------------------------------------

def default_split(data_cfg) -> str:
    """"test" for datasets with a held-out split (the digits), else "train" (an image folder is one split)."""
    return "test" if data_cfg.name == "digits" else "train"


def reconstruction_metrics(tokenizer, data_cfg, *, split: Optional[str] = None, num_images: Optional[int] = None,
                           batch_size: int = 64, features: str = "digits", weights=None, device="cpu",
                           side_by_side: Optional[Union[str, Path]] = None, progress: bool = False) -> dict:
    """PSNR, SSIM and rFD of `tokenizer`'s reconstructions of the images of a dataset.

    Each image x is encoded with the posterior mode (deterministic), decoded, and the decode clamped to
    [-1, 1]: x_rec = clamp(decode(encode(x)), -1, 1). PSNR and SSIM are those of `psnr` and `ssim`
    (data range 1 on the [0, 1] scale), averaged over images. rFD is the Frechet distance between the
    Gaussian statistics of the extractor's features of the originals and of the reconstructions, both
    converted to uint8 with genvis.generate.to_uint8 (greyscale repeated to RGB), exactly as
    `genvis ref` / `genvis eval fid` feed a dataset to the extractor.

    With the default digits features on data that is not the digits (an image folder), the classifier
    still runs (it sees every image as grey 16 x 16), but its features mean little there: rFD is then
    only comparable between tokenizers on the same data, never with digits numbers or FIDs elsewhere.

    Args:
        tokenizer: a genvis Tokenizer (moved to `device` in place, as nn.Module.to does, and run in eval
            mode; every submodule's training flag is restored afterwards), or a path `genvis.load_tokenizer`
            accepts (loaded on `device`).
        data_cfg: a DataConfig of an image dataset (name, path, resolution, channels pick the images;
            random_flip is ignored: no image is flipped).
        split: the dataset split. Default: "test" when the dataset has one (the digits), else "train".
        num_images: the first N images of the split. Default None: all of them. At least 2.
        batch_size: images per encode/decode and per extractor call. Default 64.
        features: "digits" (offline, the shipped classifier's 128-d features; default) or "inception"
            (2048-d pool features; needs `weights` or torch-fidelity's file in the hub cache).
        weights: the extractor's weights file (see genvis.evaluation.features.build_extractor).
        device: where the tokenizer and the extractor run. Default "cpu".
        side_by_side: a .png path: a grid of the first min(16, N) originals (top row) over their
            reconstructions (bottom row), 2-px black padding, written atomically once the metrics are done.
        progress: a tqdm bar of images on stderr (when it is a terminal).

    Returns:
        {"psnr": mean dB over images (+inf as soon as one image is reconstructed exactly; no cap),
         "ssim": mean SSIM, "rfd": Frechet distance, "num_images": N, "features": features, "split": split};
        for a discrete tokenizer also "codebook_size", "codebook_usage" and "perplexity" over the N images'
        ids, and for a multi-scale one "scales" (see `codebook_report`).
    """
    from tqdm.auto import tqdm

    check_feature_set(features)
    if batch_size < 1:
        raise GenvisError(f"batch_size {batch_size}: must be >= 1")
    if side_by_side is not None and Path(side_by_side).suffix.lower() != ".png":
        raise GenvisError(f"side_by_side {side_by_side}: expected a .png path")
    split = default_split(data_cfg) if split is None else split
    dataset = build_dataset(data_cfg, split)
    what = f"data.name={data_cfg.name} split {split}"
    if getattr(dataset, "encoded_by", None) is not None:
        raise GenvisError(f"{what}: already latents (encoded by {dataset.encoded_by}); "
                          "reconstruction needs an image dataset")
    available = len(dataset)
    num = available if num_images is None else int(num_images)
    if num > available:
        raise GenvisError(f"num_images {num}: {what} holds only {available} images")
    if num < 2:
        raise GenvisError(f"{what}: {num} image(s); the Frechet distance (rfd) needs at least 2")

    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer, device=device)
    modes = [(module, module.training) for module in tokenizer.modules()]  # restored one by one: mixed states too
    tokenizer.to(device).eval()
    layer = STATS_LAYER[features]
    extractor = build_extractor(features, weights=weights, device=device, features=[layer])
    acc_orig, acc_rec = FeatureAccumulator(stats=(layer,)), FeatureAccumulator(stats=(layer,))
    psnr_sum, ssim_sum = 0.0, 0.0
    counts = [] if tokenizer.kind == "discrete" else None  # per id map (one, or one per scale): code counts
    shown_orig, shown_rec = [], []  # uint8 NHWC of the first SIDE_BY_SIDE_MAX images
    try:
        with torch.no_grad(), tqdm(total=num, desc="reconstruction", unit="img", dynamic_ncols=True,
                                   disable=None if progress else True) as bar:
            for start in range(0, num, batch_size):
                stop = min(start + batch_size, num)
                images = torch.stack([dataset[i][0] for i in range(start, stop)]).to(device)  # B, C, H, W in [-1, 1]
                encoded = tokenizer.encode(images)
                if counts is not None:
                    _count_codes(counts, encoded, tokenizer.vocab_size)
                recon = tokenizer.decode(encoded).float().clamp(-1.0, 1.0)
                if recon.shape != images.shape:
                    raise GenvisError(f"the tokenizer reconstructs {list(images.shape[1:])} images as "
                                      f"{list(recon.shape[1:])}; expected the same shape")
                if not torch.isfinite(recon).all():
                    raise GenvisError(f"the tokenizer decoded non-finite values (images {start}..{stop - 1} of {what})")
                psnr_sum += float(psnr(images, recon).sum())
                ssim_sum += float(ssim(images, recon).sum())
                orig_u8, rec_u8 = to_uint8(images.cpu()), to_uint8(recon.cpu())  # B, H, W, C
                extract(extractor, [_to_nchw3(orig_u8, what)], acc_orig)
                extract(extractor, [_to_nchw3(rec_u8, what)], acc_rec)
                if start < SIDE_BY_SIDE_MAX:
                    shown_orig.append(orig_u8[: SIDE_BY_SIDE_MAX - start])
                    shown_rec.append(rec_u8[: SIDE_BY_SIDE_MAX - start])
                bar.update(stop - start)
    finally:
        for module, training in modes:
            module.training = training

    rfd = frechet_distance(*acc_orig.mu_sigma(layer), *acc_rec.mu_sigma(layer))
    if side_by_side is not None:
        top, bottom = np.concatenate(shown_orig), np.concatenate(shown_rec)
        save_grid(np.concatenate([top, bottom]), side_by_side, nrow=top.shape[0])
    result = {"psnr": psnr_sum / num, "ssim": ssim_sum / num, "rfd": rfd,
              "num_images": num, "features": features, "split": split}
    if counts is not None:
        result.update(codebook_report(counts, tokenizer, num))
    return result


def _count_codes(counts: list, encoded, vocab_size: int) -> None:
    """Add a batch's ids (a tensor, or a list of per-scale tensors) to the per-map code counts."""
    maps = list(encoded) if isinstance(encoded, (list, tuple)) else [encoded]
    if not counts:
        counts.extend(torch.zeros(vocab_size, dtype=torch.float64) for _ in maps)
    for total, ids in zip(counts, maps):
        total += torch.bincount(ids.flatten().cpu(), minlength=vocab_size).double()


def codebook_report(counts: list, tokenizer, num_images: int) -> dict:
    """Codebook usage (fraction of the vocabulary used over the images) and perplexity (exp of the entropy
    of the code frequencies); for a multi-scale tokenizer also per scale, with the usage relative to the codes
    a scale can reach: a p x p scale gives p*p*N ids, so it reaches at most min(vocab, p*p*N) codes."""
    from genvis.tokenizers.vq import usage_and_perplexity

    total = sum(counts)
    usage, perplexity = usage_and_perplexity(total / total.sum())
    report = {"codebook_size": tokenizer.vocab_size, "codebook_usage": float(usage), "perplexity": float(perplexity)}
    if len(counts) > 1:
        scales = []
        for p, c in zip(tokenizer.scales, counts):
            used, ppl = usage_and_perplexity(c / c.sum())
            reachable = min(tokenizer.vocab_size, p * p * num_images)
            codes = int((c > 0).sum())
            scales.append({"scale": p, "codes_used": codes, "usage": float(used), "reachable": reachable,
                           "usage_of_reachable": codes / reachable, "perplexity": float(ppl)})
        report["scales"] = scales
    return report
