"""FID/IS/KID/precision-recall through torch-fidelity extractors, reference files, and the CLI.

Everything runs offline on the digits classifier's features ("genvis-digits"); the Inception
path is checked with synthetic weights in torch-fidelity's layout saved to a temporary file
(write_synthetic_inception_weights; nothing is downloaded).
"""
import io
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genvis.cli import main
from genvis.errors import GenvisError
from genvis.data import DigitsDataset
from genvis.evaluation.fid import feature_statistics, frechet_distance
from genvis.evaluation.features import (
    FeatureAccumulator,
    build_extractor,
    extract,
    inception_hub_file,
    write_synthetic_inception_weights,
)
from genvis.evaluation.reference import compute_metrics, open_source, read_statistics, write_reference
from genvis.generate import to_uint8

N = 200


class NotATensor:
    """A Python object: a checkpoint holding one can only be read by unpickling."""

    def __init__(self):
        self.value = 1


def _write_folder(folder, images_nhwc):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_nhwc):
        Image.fromarray(img[..., 0]).save(folder / f"{i:04d}.png")  # greyscale PNGs
    return folder


@pytest.fixture(scope="module")
def digits_u8():
    """uint8 NHWC [400, 16, 16, 1]: two disjoint sets of 200 real digits."""
    dataset = DigitsDataset("all", resolution=16, channels=1)
    return to_uint8(dataset.images[: 2 * N])


@pytest.fixture(scope="module")
def data(tmp_path_factory, digits_u8):
    root = tmp_path_factory.mktemp("fid_data")
    a, b = digits_u8[:N], digits_u8[N:]
    folder_a = _write_folder(root / "a", a)
    folder_b = _write_folder(root / "b", b)
    npz_a = root / "a.npz"
    np.savez(npz_a, arr_0=np.repeat(a, 3, axis=-1), labels=np.zeros(N, np.int64))
    return {"a": folder_a, "b": folder_b, "npz_a": npz_a, "u8_a": a, "u8_b": b}


def _cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _rel(x, y):
    return abs(x - y) / max(abs(y), 1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 100, 1024])
def test_accumulator_matches_feature_statistics(chunk):
    """Every chunk size (pairwise merges of 1-row to whole-set chunks) gives np.cov's statistics."""
    gen = torch.Generator().manual_seed(0)
    feats = 5.0 + 0.3 * torch.randn(1003, 64, generator=gen, dtype=torch.float64)  # offset mean: no cancellation
    acc = FeatureAccumulator(stats=("f",), keep=("f",), chunk=chunk)
    for start, stop in [(0, 1), (1, 64), (64, 64), (64, 500), (500, 1003)]:  # uneven batches, sizes 1 and 0
        acc.update({"f": feats[start:stop]})
    assert acc.mu_sigma("f")[0].tobytes() == acc.mu_sigma("f")[0].tobytes()  # reading twice changes nothing
    mu, sigma = acc.mu_sigma("f")
    mu_ref, sigma_ref = feature_statistics(feats)
    assert acc.num == 1003 and mu.dtype == sigma.dtype == np.float64
    assert np.max(np.abs(mu - mu_ref)) <= 1e-10 * np.max(np.abs(mu_ref))
    assert np.max(np.abs(sigma - sigma_ref)) <= 1e-10 * np.max(np.abs(sigma_ref))
    assert torch.equal(acc.kept("f"), feats.float())


def test_accumulator_refused_batch_leaves_no_trace():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=gen), torch.randn(300, 3, generator=gen)
    acc = FeatureAccumulator(stats=("a", "b"), chunk=50)
    acc.update({"a": a[:100], "b": b[:100]})
    with pytest.raises(GenvisError, match="'b' of shape"):
        acc.update({"a": a[100:200], "b": torch.randn(100, 4)})  # "a" is fine, "b" has the wrong width
    with pytest.raises(GenvisError, match="missing"):
        acc.update({"a": a[100:200]})
    acc.update({"a": a[100:], "b": b[100:]})
    for name, x in (("a", a), ("b", b)):
        mu, sigma = acc.mu_sigma(name)
        mu_ref, sigma_ref = feature_statistics(x)
        assert acc.num == 300 and np.allclose(mu, mu_ref, atol=1e-12) and np.allclose(sigma, sigma_ref, atol=1e-12)


def test_digits_extractor_matches_digits_module(digits_u8):
    from genvis.evaluation.digits import _classify, _shared_classifier

    x = torch.from_numpy(np.repeat(digits_u8[:50], 3, axis=-1)).permute(0, 3, 1, 2).contiguous()
    extractor = build_extractor("digits")
    acc = extract(extractor, [x[:20], x[20:]], keep=("penultimate", "logits_unbiased"))
    expected, _ = _classify(_shared_classifier(), digits_u8[:50], batch_size=64)
    # equal up to float32 rounding (channel mean of 3 equal values, batch-size-dependent conv kernels)
    diff = (acc.kept("penultimate") - expected).abs().max().item()
    print(f"max |digits extractor - digits_metrics features| = {diff:.3g}")
    assert diff <= 1e-5 * expected.abs().max().item()
    head = _shared_classifier().head
    logits = acc.kept("logits_unbiased")
    assert logits.shape == (50, 10)
    assert torch.allclose(logits + head.bias, head(expected), atol=1e-5)


def test_fid_of_set_against_itself_is_zero(capsys, data):
    for samples, ref in [(data["a"], data["npz_a"]), (data["npz_a"], data["a"]), (data["a"], data["a"])]:
        rc, out, err = _cli(capsys, ["eval", "fid", str(samples), "--ref", str(ref), "--features", "digits",
                                     "--batch-size", "37"])
        assert rc == 0, err
        result = json.loads(out)
        assert abs(result["frechet_inception_distance"]) < 1e-6
        assert result["num_samples"] == N and result["features"] == "digits"
    # and clearly non-zero against a different set
    rc, out, _ = _cli(capsys, ["eval", "fid", str(data["a"]), "--ref", str(data["b"]), "--features", "digits"])
    assert rc == 0 and json.loads(out)["frechet_inception_distance"] > 1.0


def test_metrics_match_torch_fidelity(data):
    import torch_fidelity

    ours = compute_metrics(data["a"], data["b"], metrics=("fid", "isc", "kid", "prc"), features="digits",
                           batch_size=64)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(data["a"]), input2=str(data["b"]), cuda=False, batch_size=64, cache=False, verbose=False,
        save_cpu_ram=True, fid=True, isc=True, kid=True, prc=True, feature_extractor="genvis-digits",
        feature_layer_fid="penultimate", feature_layer_kid="penultimate", feature_layer_prc="penultimate",
        feature_layer_isc="logits_unbiased", kid_subset_size=N,
    )
    keys = ["frechet_inception_distance", "inception_score_mean", "inception_score_std",
            "kernel_inception_distance_mean", "kernel_inception_distance_std", "precision", "recall", "f_score"]
    rel = {k: _rel(ours[k], theirs[k]) for k in keys}
    print("relative differences vs torch-fidelity:", rel)
    assert all(r < 1e-4 for r in rel.values()), (rel, ours, theirs)
    assert ours["frechet_inception_distance"] > 1.0 and 0 < ours["precision"] <= 1


def test_kid_and_is_match_their_formulas(data):
    """KID (unbiased MMD^2, kernel (x.y/d + 1)^3, on torch-fidelity's seeded subsets of 50 of 200) and IS
    (one split: exp E[KL(p(y|x) || p(y))]) written out in numpy on the extractor's own features."""
    extractor = build_extractor("digits")
    f1, f2 = (extract(extractor, open_source(data[k]).batches(64), keep=("penultimate", "logits_unbiased"))
              for k in ("a", "b"))
    x, y = (f.kept("penultimate").double().numpy() for f in (f1, f2))
    rng, mmds = np.random.RandomState(2020), []
    for _ in range(3):
        a, b = x[rng.choice(N, 50, replace=False)], y[rng.choice(N, 50, replace=False)]
        k_aa, k_bb, k_ab = ((u @ v.T / x.shape[1] + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        off = 50 * 49
        mmds.append((k_aa.sum() - np.trace(k_aa)) / off + (k_bb.sum() - np.trace(k_bb)) / off - 2 * k_ab.mean())
    logits = f1.kept("logits_unbiased").double()
    p = torch.softmax(logits, dim=1).numpy()
    expected_is = float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), axis=1))))

    ours = compute_metrics(data["a"], data["b"], metrics=("kid", "isc"), features="digits", kid_subsets=3,
                           kid_subset_size=50, isc_splits=1)
    print("KID", ours["kernel_inception_distance_mean"], np.mean(mmds), "IS", ours["inception_score_mean"], expected_is)
    assert np.mean(mmds) > 1.0 and _rel(ours["kernel_inception_distance_mean"], np.mean(mmds)) < 1e-5
    assert _rel(ours["kernel_inception_distance_std"], np.std(mmds)) < 1e-4
    assert expected_is > 2.0 and _rel(ours["inception_score_mean"], expected_is) < 1e-5


def test_ref_file_matches_folder(capsys, data, tmp_path):
    out = tmp_path / "ref.npz"
    rc, stdout, err = _cli(capsys, ["ref", str(data["a"]), "--out", str(out), "--features", "digits"])
    assert rc == 0, err
    with np.load(out) as ref:  # ADM's keys: mu/sigma (pooled) and mu_s/sigma_s (spatial, for sFID)
        assert sorted(ref.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        assert ref["mu"].dtype == np.float64 and ref["mu"].shape == (128,)
        assert ref["sigma"].dtype == np.float64 and ref["sigma"].shape == (128, 128)
        assert ref["mu_s"].dtype == ref["sigma_s"].dtype == np.float64
        assert ref["mu_s"].shape == (7 * 8 * 8,) and ref["sigma_s"].shape == (7 * 8 * 8, 7 * 8 * 8)
    assert json.loads(stdout)["num_images"] == N

    out_img = tmp_path / "ref_images.npz"
    rc, _, err = _cli(capsys, ["ref", str(data["a"]), "--out", str(out_img), "--features", "digits", "--with-images",
                               "--batch-size", "33"])
    assert rc == 0, err
    with np.load(out_img) as ref:
        assert sorted(ref.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (N, 16, 16, 3)
        np.testing.assert_array_equal(ref["arr_0"], np.repeat(data["u8_a"], 3, axis=-1))
    assert sorted(os.listdir(tmp_path)) == ["ref.npz", "ref_images.npz"]  # no temporary files left

    fid_folder = compute_metrics(data["b"], data["a"], features="digits")["frechet_inception_distance"]
    for ref in (out, out_img):
        rc, stdout, err = _cli(capsys, ["eval", "fid", str(data["b"]), "--ref", str(ref), "--features", "digits"])
        assert rc == 0, err
        fid_file = json.loads(stdout)["frechet_inception_distance"]
        # ref_images.npz was made with batch size 33: float32 features differ in the last bits
        assert _rel(fid_file, fid_folder) < 1e-7, (ref.name, fid_file, fid_folder)
    # the images inside ref_images.npz make KID computable; a stats-only file does not
    kid = compute_metrics(data["b"], out_img, metrics=("kid",), features="digits", kid_subsets=10)
    kid_folder = compute_metrics(data["b"], data["a"], metrics=("kid",), features="digits", kid_subsets=10)
    assert kid["kernel_inception_distance_mean"] > 0
    assert _rel(kid["kernel_inception_distance_mean"], kid_folder["kernel_inception_distance_mean"]) < 1e-6
    rc, _, err = _cli(capsys, ["eval", "fid", str(data["b"]), "--ref", str(out), "--features", "digits",
                               "--metrics", "fid,kid"])
    assert rc == 2 and "need the reference images" in err and len(err.strip().splitlines()) == 1


def _adm_spatial(maps_NCHW):
    """ADM's spatial features written out independently: TF's NHWC map, [..., :7], reshape [N, -1]."""
    nhwc = maps_NCHW.permute(0, 2, 3, 1).numpy()
    return nhwc[..., :7].reshape(nhwc.shape[0], -1).astype(np.float64)


def _scipy_fd(f1, f2):
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_sfid_digits_matches_independent_computation(capsys, data, tmp_path):
    """sFID on the digits classifier's first-block maps equals numpy/scipy on maps taken from the
    classifier directly; a stored mu_s/sigma_s gives the same value; the set against itself is 0."""
    from genvis.evaluation.digits import _shared_classifier, prepare_images

    classifier = _shared_classifier()
    with torch.no_grad():
        maps = [classifier.conv[:5](prepare_images(np.repeat(data[k], 3, axis=-1))) for k in ("u8_b", "u8_a")]
    expected = _scipy_fd(*(_adm_spatial(m) for m in maps))
    ours = compute_metrics(data["b"], data["a"], metrics=("fid", "sfid"), features="digits", batch_size=64)
    print("sFID digits:", ours["spatial_frechet_inception_distance"], "independent:", expected)
    assert expected > 1.0 and _rel(ours["spatial_frechet_inception_distance"], expected) < 1e-4
    fid_only = compute_metrics(data["b"], data["a"], features="digits")
    assert ours["frechet_inception_distance"] == pytest.approx(fid_only["frechet_inception_distance"], rel=1e-9)

    ref = tmp_path / "ref.npz"
    assert _cli(capsys, ["ref", str(data["a"]), "--out", str(ref), "--features", "digits"])[0] == 0
    rc, out, err = _cli(capsys, ["eval", "fid", str(data["b"]), "--ref", str(ref), "--features", "digits",
                                 "--metrics", "sfid"])
    assert rc == 0, err
    assert _rel(json.loads(out)["spatial_frechet_inception_distance"], ours["spatial_frechet_inception_distance"]) < 1e-7
    rc, out, err = _cli(capsys, ["eval", "fid", str(data["a"]), "--ref", str(ref), "--features", "digits",
                                 "--metrics", "sfid,fid"])
    assert rc == 0 and abs(json.loads(out)["spatial_frechet_inception_distance"]) < 1e-6

    # a statistics file without the spatial pair: one line naming the key
    with np.load(ref) as f:
        np.savez(tmp_path / "old.npz", mu=f["mu"], sigma=f["sigma"])
    rc, out, err = _cli(capsys, ["eval", "fid", str(data["b"]), "--ref", str(tmp_path / "old.npz"), "--features",
                                 "digits", "--metrics", "fid,sfid"])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "old.npz" in err and "'mu_s'" in err and "sfid" in err


def test_sfid_inception_features_are_adm_mixed_6_conv(inception_weights):
    """genvis's Inception "spatial" feature is ADM's mixed_6/conv[..., :7] at 17x17 (2023-d): the first 7
    channels of torch-fidelity's Mixed_6d.branch1x1, flattened NHWC, taken here by a hook on
    torch-fidelity's own model."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    extractor = build_extractor("inception", weights=inception_weights, features=["spatial", "2048"])
    spatial, pooled = extractor(x)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=str(inception_weights)).eval()
    captured = {}
    theirs.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("conv", o))
    with torch.no_grad():
        (expected_pooled,) = theirs(x)
    expected = torch.from_numpy(_adm_spatial(captured["conv"])).float()
    assert spatial.shape == (2, 2023) and expected.abs().max() > 0.05 and (expected > 0).float().mean() > 0.01
    assert (spatial - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (pooled - expected_pooled).abs().max() <= 1e-4 * expected_pooled.abs().max()
    # alone, or with features the network gives before Mixed_6d: the same spatial features
    for features in (["spatial"], ["64", "spatial"], ["spatial", "192"]):
        outputs = dict(zip(features, build_extractor("inception", weights=inception_weights, features=features)(x)))
        assert torch.equal(outputs["spatial"], spatial), features


def test_dataset_config_source(tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  name: digits\n  resolution: 16\n  channels: 1\n")
    source = open_source(config, split="test")
    assert len(source) == 360
    first = next(iter(source.batches(50)))
    expected = to_uint8(DigitsDataset("test", resolution=16).images[:50])
    assert first.dtype == torch.uint8 and first.shape == (50, 3, 16, 16)
    assert torch.equal(first, torch.from_numpy(np.repeat(expected, 3, axis=-1)).permute(0, 3, 1, 2))
    assert sum(b.shape[0] for b in source.batches(128)) == 360


def test_stream_npz_and_read_statistics(data, tmp_path):
    source = open_source(data["npz_a"])
    batches = list(source.batches(64))
    assert [b.shape[0] for b in batches] == [64, 64, 64, 8]
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1)[..., :1].numpy(), data["u8_a"])
    out = tmp_path / "r.npz"
    write_reference(source, out, build_extractor("digits", features=["penultimate"]), batch_size=50)
    mu, sigma = read_statistics(out)
    feats = extract(build_extractor("digits"), source.batches(200), keep=("penultimate",)).kept("penultimate")
    mu_ref, sigma_ref = feature_statistics(feats)
    assert np.allclose(mu, mu_ref, rtol=1e-6, atol=1e-9) and np.allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-9)
    assert abs(frechet_distance(mu, sigma, mu_ref, sigma_ref)) < 1e-6


def _bad_folder_empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder, "no images found"


def _bad_folder_mixed(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b.png")
    return folder, "different sizes"


def _bad_folder_corrupt(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder, "broken.png"


def _bad_folder_truncated(tmp_path):
    # a valid header, so the folder scan passes; decoding fails mid-run, after the output file was started
    folder = tmp_path / "truncated"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    noise = np.random.RandomState(0).randint(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "3_cut.png")
    data = (folder / "3_cut.png").read_bytes()
    (folder / "3_cut.png").write_bytes(data[: len(data) // 2])
    return folder, "3_cut.png"


@pytest.mark.parametrize("make", [_bad_folder_empty, _bad_folder_mixed, _bad_folder_corrupt, _bad_folder_truncated])
def test_bad_image_folders(capsys, tmp_path, data, make):
    folder, expected = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for batch in ("64", "2"):  # one batch, or the bad file in a later batch than the first
        rc, stdout, err = _cli(capsys, ["ref", str(folder), "--out", str(out_dir / "ref.npz"), "--features", "digits",
                                        "--batch-size", batch, "--with-images"])
        assert rc == 2 and stdout == ""
        assert len(err.strip().splitlines()) == 1 and expected in err, err
        assert os.listdir(out_dir) == []
    rc, _, err = _cli(capsys, ["eval", "fid", str(folder), "--ref", str(data["a"]), "--features", "digits"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_stats_file_without_mu(capsys, tmp_path, data):
    bad = tmp_path / "stats.npz"
    np.savez(bad, sigma=np.eye(128))
    rc, stdout, err = _cli(capsys, ["eval", "fid", str(data["a"]), "--ref", str(bad), "--features", "digits"])
    assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert str(bad) in err and "'mu'" in err


def test_unknown_metric_and_features(capsys, data):
    rc, _, err = _cli(capsys, ["eval", "fid", str(data["a"]), "--ref", str(data["a"]), "--metrics", "fid,bogus"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "bogus" in err and "fid, isc, kid, prc, sfid" in err
    rc, _, err = _cli(capsys, ["eval", "fid", str(data["a"]), "--ref", str(data["a"]), "--features", "clip"])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "inception, digits" in err


def test_inception_without_weights_is_refused(capsys, tmp_path, data, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    assert not inception_hub_file().exists()
    out = tmp_path / "ref.npz"
    for argv in (["eval", "fid", str(data["a"]), "--ref", str(data["b"])], ["ref", str(data["a"]), "--out", str(out)]):
        rc, stdout, err = _cli(capsys, argv)
        assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1
        assert "--inception-weights" in err and inception_hub_file().name in err
    assert not out.exists() and not (tmp_path / "torch_home").exists()


def test_pickled_inception_weights_are_refused(capsys, tmp_path, data):
    weights = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": NotATensor()}, weights)
    out = tmp_path / "ref.npz"
    for argv in (["eval", "fid", str(data["a"]), "--ref", str(data["b"]), "--inception-weights", str(weights)],
                 ["ref", str(data["a"]), "--out", str(out), "--inception-weights", str(weights)]):
        rc, stdout, err = _cli(capsys, argv)
        assert rc == 2 and stdout == "" and len(err.strip().splitlines()) == 1
        assert str(weights) in err and "weights_only" in err
    assert not out.exists()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return write_synthetic_inception_weights(tmp_path_factory.mktemp("inception") / "inception_synthetic.pth")


def test_inception_from_local_weights_file(inception_weights):
    """genvis's Inception (weights read with weights_only=True, channels-last convolutions) gives the
    features of torch-fidelity's own extractor loading the same file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = build_extractor("inception", weights=inception_weights)
    x = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    acc = extract(extractor, [x[:2], x[2:]], keep=("2048", "logits_unbiased"))
    feats, logits = acc.kept("2048"), acc.kept("logits_unbiased")
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(inception_weights)).eval()
    with torch.no_grad():
        expected, expected_logits = theirs(x)
    # synthetic He-scaled weights keep the features O(0.1): the tolerance is not met by near-zero outputs
    assert expected.abs().mean() > 0.05 and expected_logits.std() > 0.05
    for ours, ref in ((feats, expected), (logits, expected_logits)):
        diff = (ours - ref).abs().max().item()
        print(f"max |genvis - torch-fidelity| = {diff:.3g} (scale {ref.abs().max().item():.3g})")
        assert diff <= 1e-4 * ref.abs().max().item()


def test_inception_fid_matches_torch_fidelity(tmp_path, inception_weights, digits_u8):
    import torch_fidelity

    a = _write_folder(tmp_path / "a", digits_u8[:12])
    b = _write_folder(tmp_path / "b", digits_u8[100:112])
    ours = compute_metrics(a, b, metrics=("fid", "isc"), features="inception", weights=inception_weights,
                           batch_size=5)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(a), input2=str(b), cuda=False, batch_size=5, cache=False, verbose=False, fid=True, isc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(inception_weights))
    fid, isc = "frechet_inception_distance", "inception_score_mean"
    print(fid, ours[fid], theirs[fid], isc, ours[isc], theirs[isc])
    assert theirs[fid] > 0.1 and _rel(ours[fid], theirs[fid]) < 1e-4
    # IS is ~1 + 4e-5 with synthetic weights: compare its KL part, IS - 1
    assert theirs[isc] - 1 > 1e-5 and _rel(ours[isc] - 1, theirs[isc] - 1) < 1e-4


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars are drawn."""

    def isatty(self):
        return True


def test_progress_bars_in_cli_only(monkeypatch, data, tmp_path):
    """`eval fid` and `ref` draw tqdm bars of the feature extraction with each source's image count on a
    terminal (not when stderr is redirected: the other CLI tests see one-line stderr); the API is quiet."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["eval", "fid", str(data["a"]), "--ref", str(data["npz_a"]), "--features", "digits",
                 "--batch-size", "64"]) == 0
    bars = terminal.getvalue()
    # each bar reaches its source's total (tqdm may redraw the last state on close, so no exact count)
    assert re.search(rf"samples: 100%[^\r]*{N}/{N}", bars) and re.search(rf"reference: 100%[^\r]*{N}/{N}", bars), bars
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["ref", str(data["a"]), "--out", str(tmp_path / "ref.npz"), "--features", "digits"]) == 0
    assert "reference" in terminal.getvalue() and f"{N}/{N}" in terminal.getvalue()

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    extractor = build_extractor("digits", features=["penultimate"])
    compute_metrics(data["a"], data["b"], features="digits", extractor=extractor)
    write_reference(data["a"], tmp_path / "quiet.npz", extractor)
    x = torch.from_numpy(np.repeat(data["u8_a"][:50], 3, axis=-1)).permute(0, 3, 1, 2).contiguous()
    quiet = extract(extractor, [x[:20], x[20:]])
    assert terminal.getvalue() == ""
    # without a total the bar counts images; the features are the same with or without it
    loud = extract(extractor, [x[:20], x[20:]], progress=True, desc="features")
    assert "features" in terminal.getvalue() and "50" in terminal.getvalue() and "50/" not in terminal.getvalue()
    assert np.array_equal(loud.mu_sigma("penultimate")[1], quiet.mu_sigma("penultimate")[1])
