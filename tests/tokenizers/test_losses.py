"""genvis.tokenizers.losses against independent computations: closed forms, hand-written gradients, the
taming layout, the shipped digits classifier, and LPIPS written out from its formula (and the `lpips`
package's own module when it is installed)."""
import math

import pytest
import torch
import torch.nn.functional as F

from genvis.errors import GenvisError
from genvis.tokenizers import losses
from genvis.tokenizers.losses import (LPIPS, DigitsPerceptual, LeCam, PatchDiscriminator, adaptive_weight,
                                      build_perceptual, hinge_d_loss, hinge_g_loss, kl_loss, reconstruction_loss)

VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
               14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
               28: (512, 512)}  # torchvision vgg16 features index -> (in, out) of its 3x3 conv
VGG16_POOLS_BEFORE = (4, 9, 16, 23)  # max pools of `features` before relu5_3
LPIPS_TAPS = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def assert_one_line(err):
    message = str(err.value)
    assert message and "\n" not in message, message


# ----------------------------------------------------------------------------- pixel, KL, hinge

def test_reconstruction_loss_l1_l2_are_per_sample_means():
    x = torch.zeros(2, 1, 2, 2)
    x_rec = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    assert torch.allclose(reconstruction_loss(x, x_rec), torch.tensor([(1 + 1 + 0.5) / 4, 2.0]))
    assert torch.allclose(reconstruction_loss(x, x_rec, kind="l2"), torch.tensor([(1 + 1 + 0.25) / 4, 4.0]))
    with pytest.raises(GenvisError, match="'l3'") as err:
        reconstruction_loss(x, x_rec, kind="l3")
    assert_one_line(err)


def test_kl_loss_matches_closed_form():
    # N(1, 1) per dim: 0.5 * (1 + 1 - 1 - 0) = 0.5; N(0, e^2): 0.5 * (e^2 - 1 - 2)
    mean = torch.stack([torch.ones(4, 2, 2), torch.zeros(4, 2, 2)])
    logvar = torch.stack([torch.zeros(4, 2, 2), torch.full((4, 2, 2), 2.0)])
    expected = torch.tensor([0.5 * 16, 0.5 * (math.exp(2.0) - 3.0) * 16])
    assert torch.allclose(kl_loss(mean, logvar), expected)
    # random posteriors against torch.distributions
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).flatten(1).sum(1)
    assert torch.allclose(kl_loss(mean, logvar), expected, rtol=1e-5)


def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - real): 0, 0.5, 2, 0 -> mean 0.625
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])  # relu(1 + fake): 0, 1, 1.5, 0.5 -> mean 0.75
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.625 + 0.75)))
    assert torch.allclose(hinge_g_loss(fake), torch.tensor(0.5))  # -mean(-2, 0, 0.5, -0.5)
    assert hinge_d_loss(real, fake).dim() == 0


# ----------------------------------------------------------------------------- adaptive weight

def test_adaptive_weight_matches_hand_gradients():
    # decoder "last layer": y = W x. rec = 0.5 ||y - t||^2 -> dW = (y - t) x^T; gan = -v . y -> dW = -v x^T.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g).requires_grad_()
    x, t, v = torch.randn(4, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    y = W @ x
    rec = 0.5 * (y - t).square().sum()
    gan = -(v * y).sum()
    with torch.no_grad():
        rec_grad = torch.outer(W @ x - t, x)
        gan_grad = -torch.outer(v, x)
        expected = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    weight = adaptive_weight(rec, gan, W)
    assert weight.dim() == 0 and not weight.requires_grad
    assert torch.allclose(weight, expected, rtol=1e-5)
    (rec + weight * gan).backward()  # the graph is kept for the caller's backward
    assert torch.allclose(W.grad, rec_grad + expected * gan_grad, rtol=1e-4, atol=1e-6)

    # no GAN gradient: ||rec_grad|| / 1e-4, clamped to max_weight
    W.grad = None
    rec = 0.5 * (W @ x - t).square().sum()
    assert torch.allclose(adaptive_weight(rec, 0.0 * (W @ x).sum(), W, max_weight=10.0), torch.tensor(10.0))
    with pytest.raises(GenvisError, match="last_layer") as err:
        adaptive_weight(rec, rec, torch.ones(3))
    assert_one_line(err)


# ----------------------------------------------------------------------------- LeCam

def test_lecam_ema_and_penalty_by_hand():
    lecam = LeCam(decay=0.9)
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}  # checkpointed
    lecam.update(torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0]))  # means 2, -1
    assert math.isclose(lecam.ema_real.item(), 0.1 * 2.0, rel_tol=1e-6)
    assert math.isclose(lecam.ema_fake.item(), 0.1 * -1.0, rel_tol=1e-6)
    lecam.update(torch.tensor([[4.0]]), torch.tensor([[1.0]]))
    ema_real, ema_fake = 0.9 * 0.2 + 0.1 * 4.0, 0.9 * -0.1 + 0.1 * 1.0  # 0.58, 0.01
    assert math.isclose(lecam.ema_real.item(), ema_real, rel_tol=1e-6)
    assert math.isclose(lecam.ema_fake.item(), ema_fake, rel_tol=1e-5)

    real = torch.tensor([1.0, -1.0, 0.5], requires_grad=True)
    fake = torch.tensor([0.0, 2.0], requires_grad=True)
    expected = (((1.0 - ema_fake) ** 2 + 0.0 + (0.5 - ema_fake) ** 2) / 3  # relu(real - ema_fake)^2
                + ((ema_real - 0.0) ** 2 + 0.0) / 2)  # relu(ema_real - fake)^2
    penalty = lecam.penalty(real, fake)
    assert math.isclose(penalty.item(), expected, rel_tol=1e-5)
    penalty.backward()
    assert torch.allclose(real.grad, torch.tensor([2 * (1.0 - ema_fake) / 3, 0.0, 2 * (0.5 - ema_fake) / 3]))

    restored = LeCam(decay=0.9)
    restored.load_state_dict(lecam.state_dict())
    assert restored.ema_real.item() == lecam.ema_real.item()


# ----------------------------------------------------------------------------- PatchGAN

def test_patch_discriminator_has_tamings_layout_and_init():
    disc = PatchDiscriminator(in_channels=3, ndf=64, n_layers=3, norm="batch")
    # taming's NLayerDiscriminator(3, 64, 3) state dict (BatchNorm: no conv bias before a norm)
    taming = {"main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,),
              "main.2.weight": (128, 64, 4, 4), "main.3.weight": (128,), "main.3.bias": (128,),
              "main.5.weight": (256, 128, 4, 4), "main.6.weight": (256,), "main.6.bias": (256,),
              "main.8.weight": (512, 256, 4, 4), "main.9.weight": (512,), "main.9.bias": (512,),
              "main.11.weight": (1, 512, 4, 4), "main.11.bias": (1,)}
    params = {k: tuple(v.shape) for k, v in disc.named_parameters()}
    assert params == taming
    strides = [m.stride[0] for m in disc.main if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1, 1]
    assert all(m.padding == (1, 1) for m in disc.main if isinstance(m, torch.nn.Conv2d))
    assert abs(disc.main[8].weight.std().item() - 0.02) < 0.001
    assert abs(disc.main[9].weight.mean().item() - 1.0) < 0.01 and disc.main[9].bias.abs().max() == 0

    grouped = PatchDiscriminator(in_channels=1, ndf=64, n_layers=3)
    norms = [m for m in grouped.main if isinstance(m, torch.nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(32, 128), (32, 256), (32, 512)]
    assert [(m.num_groups, m.num_channels) for m in PatchDiscriminator(ndf=8).main
            if isinstance(m, torch.nn.GroupNorm)] == [(16, 16), (32, 32), (32, 64)]


def test_patch_discriminator_map_sizes_on_small_images():
    torch.manual_seed(0)
    cases = [(16, 2, (2, 2)), (16, 1, (6, 6)), (32, 3, (2, 2)), (32, 2, (6, 6)), (64, 3, (6, 6))]
    for size, n_layers, expected in cases:
        disc = PatchDiscriminator(in_channels=1, ndf=8, n_layers=n_layers)
        out = disc(torch.randn(2, 1, size, size))
        assert tuple(out.shape) == (2, 1) + expected, (size, n_layers)
        assert disc.output_size(size, size) == expected
    # taming's n_layers=3 on 16x16: 16 -> 8 -> 4 -> 2 -> 1 -> 0, no map
    disc = PatchDiscriminator(in_channels=1, ndf=8, n_layers=3)
    assert disc.output_size(16, 16) == (0, 0)
    with pytest.raises(GenvisError, match="16x16.*n_layers <= 2") as err:
        disc(torch.randn(2, 1, 16, 16))
    assert_one_line(err)


def test_group_norm_discriminator_is_per_sample_and_batch_norm_is_not():
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    grouped = PatchDiscriminator(ndf=16, n_layers=3, norm="group").train()
    whole = grouped(x)
    halves = torch.cat([grouped(x[:2]), grouped(x[2:])])
    assert torch.allclose(whole, halves, atol=1e-6)
    torch.manual_seed(0)
    batched = PatchDiscriminator(ndf=16, n_layers=3, norm="batch").train()
    whole = batched(x)
    halves = torch.cat([batched(x[:2]), batched(x[2:])])
    assert (whole - halves).abs().max() > 1e-3
    whole.mean().backward()  # inplace LeakyReLUs after the norms keep autograd valid
    assert batched.main[0].weight.grad is not None


# ----------------------------------------------------------------------------- digits perceptual

def reference_digits_distance(x, y):
    """The digits distance from genvis.evaluation.digits' own classifier and input preparation."""
    from genvis.evaluation.digits import load_digits_classifier, prepare_images

    conv = load_digits_classifier().conv
    hx, hy, total = prepare_images(x), prepare_images(y), torch.zeros(x.shape[0])
    for i in range(9):
        hx, hy = conv[i](hx), conv[i](hy)
        if isinstance(conv[i], torch.nn.ReLU):
            nx = hx / (hx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total += (nx - ny).square().sum(1).mean((1, 2))
    return total


def test_digits_perceptual_uses_the_shipped_classifier():
    from genvis.evaluation.digits import load_digits_classifier

    perceptual = DigitsPerceptual()
    shipped = load_digits_classifier().conv.state_dict()
    assert perceptual.conv.state_dict().keys() == shipped.keys()
    assert all(torch.equal(perceptual.conv.state_dict()[k], shipped[k]) for k in shipped)
    assert not any(p.requires_grad for p in perceptual.parameters())
    assert not perceptual.train().training  # stays in eval


def test_digits_perceptual_values_symmetry_and_gradients():
    perceptual = DigitsPerceptual()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1  # colour, resized to 16
    y = (x + 0.5 * torch.randn(3, 3, 32, 32, generator=g)).clamp(-1, 1)
    d = perceptual(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(d, reference_digits_distance(x, y), rtol=1e-4, atol=1e-6)
    assert torch.allclose(perceptual(y, x), d, rtol=1e-5)
    assert torch.equal(perceptual(x, x), torch.zeros(3))
    grey = x[:, :1, ::2, ::2]  # 16x16 grey: no resize
    assert torch.allclose(perceptual(grey, y[:, :1, ::2, ::2]), reference_digits_distance(grey, y[:, :1, ::2, ::2]),
                          rtol=1e-4, atol=1e-6)

    x_rec = y.clone().requires_grad_()
    perceptual(x, x_rec).sum().backward()
    assert x_rec.grad is not None and torch.isfinite(x_rec.grad).all() and x_rec.grad.abs().sum() > 0


def test_digits_perceptual_missing_file_is_one_line(tmp_path):
    with pytest.raises(GenvisError, match="missing.safetensors") as err:
        DigitsPerceptual(tmp_path / "missing.safetensors")
    assert_one_line(err)


# ----------------------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    """(vgg16 weights, linear heads): random, in torchvision's and lpips's layouts. Convs He-normal
    (std sqrt(2 / fan_in)) so features stay O(1) through 13 convs; heads positive like the real ones.
    Only `features` is written (the classifier's 123M parameters are never read) plus one classifier key."""
    folder = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (cin * 9))
        vgg[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    vgg["classifier.6.bias"] = torch.zeros(1000)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1 for k, c in enumerate(LPIPS_CHANNELS)}
    torch.save(vgg, folder / "vgg16.pth")
    torch.save(heads, folder / "heads.pth")
    return folder / "vgg16.pth", folder / "heads.pth", vgg, heads


def lpips_by_formula(x, y, vgg, heads):
    """LPIPS v0.1 written out: scaling layer, vgg16 convs/ReLUs/pools, unit norm, 1x1 heads, spatial mean, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total = torch.zeros(x.shape[0])
    for i in range(30):
        if i in VGG16_CONVS:
            w, b = vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]
            hx, hy = F.conv2d(hx, w, b, padding=1), F.conv2d(hy, w, b, padding=1)
        elif i in VGG16_POOLS_BEFORE:
            hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
        else:
            hx, hy = hx.clamp(min=0), hy.clamp(min=0)
        if i in LPIPS_TAPS:
            nx = hx / (hx.square().sum(1, keepdim=True).sqrt() + 1e-10)
            ny = hy / (hy.square().sum(1, keepdim=True).sqrt() + 1e-10)
            w = heads[f"lin{LPIPS_TAPS.index(i)}.model.1.weight"].view(1, -1, 1, 1)
            total += ((nx - ny).square() * w).sum(1).mean((1, 2))
    return total


def test_lpips_matches_the_formula(vgg_files):
    weights, heads_file, vgg, heads = vgg_files
    lpips = LPIPS(weights, heads_file)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=g)).clamp(-1, 1)
    d = lpips(x, y)
    expected = lpips_by_formula(x, y, vgg, heads)
    assert d.shape == (2,) and (expected > 1e-3).all()
    assert torch.allclose(d, expected, rtol=1e-4)
    # smaller images from here on (VGG16 is slow on a shared CPU); 16 is the smallest size relu5_3 sees
    x, y = x[..., 8:24, 8:24], y[..., 8:24, 8:24]
    assert torch.allclose(lpips(y, x), lpips(x, y), rtol=1e-5)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    grey_x, grey_y = x[:, :1], y[:, :1]  # repeated to RGB
    assert torch.allclose(lpips(grey_x, grey_y), lpips_by_formula(grey_x.expand(-1, 3, -1, -1),
                                                                  grey_y.expand(-1, 3, -1, -1), vgg, heads), rtol=1e-4)
    x_rec = y.clone().requires_grad_()
    lpips(x, x_rec).sum().backward()
    assert torch.isfinite(x_rec.grad).all() and x_rec.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in lpips.parameters()) and not lpips.train().training
    with pytest.raises(GenvisError, match=r"\(2, 3, 8, 8\)") as err:
        lpips(x[..., :8, :8], y[..., :8, :8])
    assert_one_line(err)


def test_lpips_matches_the_lpips_package(vgg_files, monkeypatch):
    lpips_package = pytest.importorskip("lpips")
    from types import SimpleNamespace

    from torchvision.models.vgg import cfgs, make_layers

    # lpips builds a whole torchvision vgg16 (its 123M-parameter classifier included) and keeps `features`;
    # hand it torchvision's `features` alone: same modules, same indices, a fraction of the start-up time.
    make = lambda **_: SimpleNamespace(features=make_layers(cfgs["D"]))  # noqa: E731
    monkeypatch.setattr(lpips_package.pretrained_networks.tv, "vgg16", make)
    weights, heads_file, vgg, heads = vgg_files
    reference = lpips_package.LPIPS(net="vgg", version="0.1", pnet_rand=True, model_path=str(heads_file), verbose=False)
    slices = {i: k + 1 for k, (lo, hi) in enumerate(zip((-1,) + LPIPS_TAPS, LPIPS_TAPS)) for i in range(lo + 1, hi + 1)}
    reference.load_state_dict({f"net.slice{slices[int(key.split('.')[1])]}.{key.split('.', 1)[1]}": value
                               for key, value in vgg.items() if key.startswith("features.")}, strict=False)
    assert torch.equal(reference.lin2.model[1].weight, heads["lin2.model.1.weight"])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 16, 16, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expected = reference(x, y).view(2)
    assert torch.allclose(LPIPS(weights, heads_file)(x, y), expected, rtol=1e-4)


def test_lpips_heads_default_to_the_lpips_package(vgg_files):
    package_heads = losses.lpips_package_heads()
    if package_heads is None:
        pytest.skip("the lpips package is not installed")
    lpips = LPIPS(vgg_files[0])
    assert lpips.heads_path == package_heads
    shipped = torch.load(package_heads, map_location="cpu", weights_only=True)
    assert torch.equal(lpips.lins[4].weight, shipped["lin4.model.1.weight"])


def test_lpips_missing_or_wrong_files_are_one_line(vgg_files, tmp_path, monkeypatch):
    weights, heads_file, vgg, heads = vgg_files
    with pytest.raises(GenvisError, match="nope.pth: VGG16 weights not found; expected a torchvision vgg16") as err:
        LPIPS(tmp_path / "nope.pth", heads_file)
    assert_one_line(err)
    with pytest.raises(GenvisError, match="heads.pth: LPIPS linear heads not found") as err:
        LPIPS(weights, tmp_path / "heads.pth")
    assert_one_line(err)
    monkeypatch.setattr(losses, "lpips_package_heads", lambda: None)  # as without the lpips package
    with pytest.raises(GenvisError, match="lpips package is not installed") as err:
        LPIPS(weights)
    assert_one_line(err)
    torch.save({k: v for k, v in heads.items() if not k.startswith("lin3")}, tmp_path / "partial.pth")
    with pytest.raises(GenvisError, match="key 'lin3.model.1.weight' missing") as err:
        LPIPS(weights, tmp_path / "partial.pth")
    assert_one_line(err)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(GenvisError, match="garbage.pth: (refused|not a readable)") as err:
        LPIPS(tmp_path / "garbage.pth", heads_file)
    assert_one_line(err)


def test_build_perceptual_choices(vgg_files, tmp_path):
    weights, heads_file = vgg_files[:2]
    assert build_perceptual("none") == (None, "none")
    module, description = build_perceptual("digits")
    assert isinstance(module, DigitsPerceptual) and description == "digits-classifier feature distance"
    module, description = build_perceptual("auto")
    assert isinstance(module, DigitsPerceptual) and description == "digits-classifier feature distance"
    module, description = build_perceptual("auto", tmp_path / "absent.pth")
    assert isinstance(module, DigitsPerceptual) and "absent.pth" in description
    module, description = build_perceptual("auto", weights, heads_file)
    assert isinstance(module, LPIPS) and description == f"LPIPS (VGG16 from {weights})"
    with pytest.raises(GenvisError, match="needs VGG16 weights") as err:
        build_perceptual("lpips")
    assert_one_line(err)
    with pytest.raises(GenvisError, match="'vgg'.*auto, lpips, digits, none") as err:
        build_perceptual("vgg")
    assert_one_line(err)


def test_alignment_loss_by_hand_with_its_margins():
    """Two positions: z = (1, 0), (1, 1), features f = (1, 0), (0, 1). Distance matrices of cosines differ by
    1/sqrt(2) off the diagonal: relu(0.7071 - 0.25) on 2 of 4 entries; cosines z_i . f_i are 1 and 1/sqrt(2):
    relu(1 - 0.1 - cos) counts only the second (margin 0.1)."""
    from genvis.tokenizers.losses import alignment_loss

    z = torch.tensor([[1.0, 1.0], [0.0, 1.0]]).view(1, 2, 1, 2)  # [B, C, h, w]: columns are positions
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    r = math.sqrt(0.5)
    distmat, cos = 2 * (r - 0.25) / 4, (0.9 - r) / 2
    got = alignment_loss(z, f, distmat_margin=0.25, cos_margin=0.1, distmat_weight=1.0, cos_weight=1.0)
    assert got.item() == pytest.approx(distmat + cos, abs=1e-6)
    got = alignment_loss(z, f, distmat_margin=0.25, cos_margin=0.1, distmat_weight=2.0, cos_weight=0.5)
    assert got.item() == pytest.approx(2 * distmat + 0.5 * cos, abs=1e-6)
    assert alignment_loss(z, f, distmat_margin=0.8, cos_margin=0.5).item() == 0.0  # inside both margins: no pull
    assert alignment_loss(2.5 * z, f, cos_margin=0.1).item() == pytest.approx(alignment_loss(z, f, cos_margin=0.1).item())


def test_foundation_alignment_projects_the_latents_onto_the_digits_features():
    """The digits VA-VAE term: the classifier's first block (32 x 8 x 8 maps of a 16x16 digit) against a 1x1 projection
    of the latents (no bias), features resized to the latents' grid; only the projection trains."""
    from genvis.tokenizers.losses import DigitsPerceptual, FoundationAlignment, alignment_loss

    align = FoundationAlignment(4, "digits")
    assert [n for n, p in align.named_parameters() if p.requires_grad] == ["proj.weight"]
    images, z = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 4, 4, 4)
    conv = DigitsPerceptual().conv
    feat = F.interpolate(conv[:5](images), size=(4, 4), mode="bilinear", align_corners=False)
    expected = alignment_loss(F.conv2d(z, align.proj.weight), feat)
    torch.testing.assert_close(align(images, z), expected)


def test_dinov2_alignment_needs_a_local_weights_file():
    from genvis.tokenizers.losses import FoundationAlignment

    with pytest.raises(GenvisError, match="task.align_weights") as err:
        FoundationAlignment(32, "dinov2")
    assert_one_line(err)
