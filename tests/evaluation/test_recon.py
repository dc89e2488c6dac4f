"""Reconstruction metrics: PSNR and SSIM against computations written out here, and reconstruction_metrics
on the identity and on a tiny random diffusers AutoencoderKL, its rFD against features extracted here."""
import numpy as np
import pytest
import torch
from PIL import Image

from genvis.data import DataConfig, DigitsDataset
from genvis.errors import GenvisError
from genvis.evaluation.features import build_extractor
from genvis.evaluation.fid import feature_statistics, frechet_distance
from genvis.evaluation.recon import psnr, reconstruction_metrics, ssim
from genvis.tokenizers import PixelTokenizer, load_tokenizer


# ---- independent references ------------------------------------------------------------------------

def psnr_by_hand(x, y):
    """10 log10(1 / mse) per image on the [0, 1] scale."""
    a, b = (np.asarray(x, np.float64) + 1) / 2, (np.asarray(y, np.float64) + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1 / mse)


def ssim_numpy(x, y):
    """Wang et al. 2004 per image, written window by window: for every 11x11 window wholly inside the image,
    Gaussian-weighted (sigma 1.5) means and population moments, the SSIM formula with C1 = 0.01^2, C2 = 0.03^2
    (data range 1 on [0, 1]); mean over windows, then over channels."""
    a, b = (np.asarray(x, np.float64) + 1) / 2, (np.asarray(y, np.float64) + 1) / 2
    k = np.arange(-5, 6)
    g = np.exp(-k ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n, c, h, wd = a.shape
    out = np.zeros(n)
    for i in range(n):
        per_channel = []
        for ch in range(c):
            values = []
            for r in range(h - 10):
                for s in range(wd - 10):
                    p, q = a[i, ch, r : r + 11, s : s + 11], b[i, ch, r : r + 11, s : s + 11]
                    mx, my = (w * p).sum(), (w * q).sum()
                    vx, vy = (w * (p - mx) ** 2).sum(), (w * (q - my) ** 2).sum()
                    cxy = (w * (p - mx) * (q - my)).sum()
                    values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
            per_channel.append(np.mean(values))
        out[i] = np.mean(per_channel)
    return out


def _u8_nchw3(images):
    """[-1, 1] NCHW -> uint8 [N, 3, H, W] with DiT's clamp(127.5 x + 128, 0, 255), grey repeated to 3."""
    u8 = torch.clamp(127.5 * images.double() + 128.0, 0, 255).to(torch.uint8)
    return u8.repeat(1, 3 // u8.shape[1], 1, 1)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    return vae.eval()


# ---- psnr / ssim --------------------------------------------------------------------------------------

def _pairs():
    """(name, x, y) image pairs in [-1, 1]: random, noisy copies, and structured images of two sizes."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1
    x = rand(3, 3, 16, 16)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(13.0), indexing="ij")
    gradient = (xx / 12 * 2 - 1).expand(1, 1, 20, 13)
    checker = (((yy // 2 + xx // 3) % 2) * 2 - 1).expand(1, 1, 20, 13)
    ramp = (yy / 19 * 2 - 1).expand(1, 1, 20, 13)
    structured_x = torch.cat([gradient, checker, gradient, torch.full_like(gradient, 0.2)])
    structured_y = torch.cat([checker, checker.roll(1, dims=-1), ramp, torch.full_like(gradient, -0.4)])
    digits = DigitsDataset("test", resolution=16, channels=1).images[:4].double()
    return [("random", x, rand(3, 3, 16, 16)), ("noisy", x, noisy), ("structured", structured_x, structured_y),
            ("digits-shifted", digits, digits.roll(2, dims=-1)), ("digits-swapped", digits, digits.flip(0))]


@pytest.mark.parametrize("name,x,y", _pairs(), ids=[p[0] for p in _pairs()])
def test_psnr_and_ssim_match_independent_computations(name, x, y):
    np.testing.assert_allclose(psnr(x, y).numpy(), psnr_by_hand(x, y), rtol=1e-12)
    np.testing.assert_allclose(ssim(x, y).numpy(), ssim_numpy(x, y), rtol=1e-10, atol=1e-12)
    # float32 input is computed in float64 too: the same numbers up to the input's rounding
    x32, y32 = x.float(), y.float()
    np.testing.assert_allclose(ssim(x32, y32).numpy(), ssim_numpy(x32, y32), rtol=1e-10, atol=1e-12)
    assert psnr(x, y).dtype == ssim(x, y).dtype == torch.float64 and ssim(x, y).shape == (x.shape[0],)


def test_ssim_of_an_image_with_itself_is_one_and_psnr_is_inf():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(ssim(x, x), torch.ones(4, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    # known values: a constant offset of 0.2 on [-1, 1] is 0.1 on [0, 1] -> mse 0.01 -> 20 dB
    assert torch.allclose(psnr(x.clamp(-1, 0.8), x.clamp(-1, 0.8) + 0.2), torch.full((4,), 20.0, dtype=torch.float64))


def test_psnr_and_ssim_refuse_bad_shapes():
    with pytest.raises(GenvisError, match="11x11"):
        ssim(torch.zeros(1, 1, 10, 16), torch.zeros(1, 1, 10, 16))
    with pytest.raises(GenvisError, match=r"\(1, 1, 16, 16\) and \(1, 3, 16, 16\)"):
        psnr(torch.zeros(1, 1, 16, 16), torch.zeros(1, 3, 16, 16))


# ---- reconstruction_metrics ---------------------------------------------------------------------------

def test_identity_tokenizer_is_perfect_on_the_digits_test_split():
    result = reconstruction_metrics(PixelTokenizer(), DataConfig())
    assert result["psnr"] == float("inf") and result["ssim"] == 1.0 and abs(result["rfd"]) < 1e-8
    assert (result["num_images"], result["features"], result["split"]) == (360, "digits", "test")


def test_tiny_vae_metrics_match_features_computed_here(tmp_path):
    tiny_vae().save_pretrained(str(tmp_path / "vae"))
    tok = load_tokenizer(tmp_path / "vae")
    cfg = DataConfig(channels=3)
    n, batch = 200, 48  # more images than the 128 features: with 40 the rank-39 covariances put the distance's square
    # root on near-zero eigenvalues, which turned float64 rounding into a 1.1e-6 relative difference (AVX2 CPU)
    png = tmp_path / "out" / "recon.png"
    modes = [m.training for m in tok.modules()]
    result = reconstruction_metrics(tok, cfg, num_images=n, batch_size=batch, side_by_side=png)
    assert [m.training for m in tok.modules()] == modes  # run in eval mode, the caller's modes restored

    # the same reconstructions, batch by batch as the function encodes them, then everything by hand
    originals = DigitsDataset("test", resolution=16, channels=3).images[:n]
    with torch.no_grad():
        recon = torch.cat([tok.decode(tok.encode(originals[i : i + batch])).clamp(-1, 1) for i in range(0, n, batch)])
    extractor = build_extractor("digits", features=["penultimate"])
    with torch.no_grad():
        f_orig, f_rec = extractor(_u8_nchw3(originals))[0], extractor(_u8_nchw3(recon))[0]
    expected_rfd = frechet_distance(*feature_statistics(f_orig), *feature_statistics(f_rec))
    assert result["rfd"] == pytest.approx(expected_rfd, rel=1e-6) and result["rfd"] > 0
    assert result["psnr"] == pytest.approx(psnr_by_hand(originals, recon).mean(), rel=1e-9)
    assert result["ssim"] == pytest.approx(ssim_numpy(originals, recon).mean(), rel=1e-9)
    assert np.isfinite(result["psnr"]) and result["psnr"] < 40 and result["ssim"] < 1
    assert (result["num_images"], result["split"]) == (n, "test")

    # 16 originals over their 16 reconstructions, 16x16 tiles with 2-px padding: 290 x 38
    grid = np.asarray(Image.open(png))
    assert grid.shape == (2 * 18 + 2, 16 * 18 + 2, 3)
    u8 = lambda t: _u8_nchw3(t).permute(0, 2, 3, 1).numpy()
    for i in (0, 11, 12, 15):  # both sides of the batch boundary
        assert np.array_equal(grid[2:18, 2 + 18 * i : 18 + 18 * i], u8(originals[i : i + 1])[0])
        assert np.array_equal(grid[20:36, 2 + 18 * i : 18 + 18 * i], u8(recon[i : i + 1])[0])
    assert [p.name for p in png.parent.iterdir()] == ["recon.png"]  # no temporary left behind


def test_image_folder_uses_its_only_split(tmp_path):
    digits = DigitsDataset("test", resolution=16, channels=1).images[:6]
    for i, image in enumerate(digits):
        folder = tmp_path / "data" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_u8_nchw3(image[None])[0, 0].numpy()).save(folder / f"{i}.png")
    cfg = DataConfig(name="folder", path=str(tmp_path / "data"), channels=1)
    result = reconstruction_metrics(PixelTokenizer(), cfg)
    assert (result["split"], result["num_images"], result["ssim"], result["psnr"]) == ("train", 6, 1.0, float("inf"))


def test_bad_input_is_one_line(tmp_path):
    for kwargs, message in [(dict(num_images=1), "needs at least 2"), (dict(num_images=361), "holds only 360"),
                            (dict(side_by_side=tmp_path / "x.jpg"), "expected a .png path"),
                            (dict(features="clip"), "expected one of")]:
        with pytest.raises(GenvisError, match=message) as err:
            reconstruction_metrics(PixelTokenizer(), DataConfig(), **kwargs)
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
