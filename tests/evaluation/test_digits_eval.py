"""The shipped digits classifier and the digits metrics built on it."""
import json

import numpy as np
import pytest
import torch

from genvis.data import DigitsDataset
from genvis.errors import GenvisError
from genvis.evaluation import feature_statistics, frechet_distance
from genvis.evaluation.digits import (
    CLASSIFIER_PATH,
    _reference_statistics,
    digits_metrics,
    evaluate_npz,
    load_digits_classifier,
    prepare_images,
)


@pytest.fixture(scope="module")
def test_split():
    return DigitsDataset("test", resolution=16)


@pytest.fixture(scope="module")
def model():
    return load_digits_classifier()


def test_shipped_weights_accuracy(model, test_split):
    assert not model.training
    with torch.no_grad():
        logits = model(test_split.images)
        feats = model.features(test_split.images)
    assert logits.shape == (360, 10) and feats.shape == (360, 128) and feats.min() >= 0
    accuracy = (logits.argmax(1) == test_split.labels).double().mean().item()
    assert accuracy >= 0.97
    recorded = json.loads(CLASSIFIER_PATH.with_suffix(".json").read_text())
    assert recorded["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_test_split_against_itself(model, test_split):
    metrics = digits_metrics(test_split.images, test_split.labels)
    assert set(metrics) == {"fd", "num", "class_accuracy"} and metrics["num"] == 360
    assert isinstance(metrics["fd"], float) and abs(metrics["fd"]) < 1e-6
    with torch.no_grad():
        expected = (model(test_split.images).argmax(1) == test_split.labels).double().mean().item()
    assert metrics["class_accuracy"] == pytest.approx(expected) and metrics["class_accuracy"] >= 0.97
    # Colour input at another resolution is compared with the test split at that resolution.
    rgb32 = DigitsDataset("test", resolution=32, channels=3)
    assert abs(digits_metrics(rgb32.images)["fd"]) < 1e-6


def test_real_digits_close_noise_far(model, test_split):
    train = DigitsDataset("train", resolution=16)
    real = digits_metrics(train.images, train.labels.numpy())
    assert real["class_accuracy"] >= 0.97
    noise = torch.rand(360, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fake = digits_metrics(noise)
    assert "class_accuracy" not in fake
    assert fake["fd"] > 20 * real["fd"] > 0
    # Independent recomputation: features straight from the model, statistics by numpy.
    with torch.no_grad():
        f_train = model.features(train.images).double().numpy()
        f_test = model.features(test_split.images).double().numpy()
    mu1, s1 = f_train.mean(0), np.cov(f_train, rowvar=False)
    mu2, s2 = f_test.mean(0), np.cov(f_test, rowvar=False)
    assert real["fd"] == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_uint8_nhwc_matches_float_nchw(model):
    rng = np.random.RandomState(0)
    for size, channels in [(16, 3), (32, 1), (24, 3)]:
        u = rng.randint(0, 256, size=(10, size, size, channels), dtype=np.uint8)
        as_float = torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1
        for uint8_input in (u, torch.from_numpy(u)):
            a, b = prepare_images(uint8_input), prepare_images(as_float)
            assert a.shape == (10, 1, 16, 16)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            with torch.no_grad():
                torch.testing.assert_close(model.features(a), model.features(b), atol=1e-5, rtol=0)


def test_prepare_images_resizing():
    # Channel mean for grey, then bilinear: 8 -> 16 upsampling is the dataset's own 16 rendering.
    d8, d16 = DigitsDataset("test", resolution=8, channels=3), DigitsDataset("test", resolution=16)
    torch.testing.assert_close(prepare_images(d8.images), d16.images, atol=1e-6, rtol=0)
    # Antialiased bilinear 2x downsampling is a triangle filter stretched by 2: output pixel i
    # (centre 2i + .5 in the source) weights source pixels 2i-1 .. 2i+2 by [1, 3, 3, 1] / 8.
    x = np.random.RandomState(1).rand(2, 1, 32, 32) * 2 - 1
    k = np.array([1, 3, 3, 1]) / 8
    rows = np.stack([x[..., 2 * i - 1 : 2 * i + 3, :].transpose(0, 1, 3, 2) @ k for i in range(1, 15)], -1)  # N,1,W,14
    expected = np.stack([rows[..., 2 * j - 1 : 2 * j + 3, :].transpose(0, 1, 3, 2) @ k for j in range(1, 15)], -1)  # N,1,14,14
    got = prepare_images(torch.from_numpy(x).float())
    np.testing.assert_allclose(got[..., 1:15, 1:15].numpy(), expected, atol=1e-6)
    with pytest.raises(GenvisError, match="channels"):
        prepare_images(torch.zeros(2, 2, 16, 16))
    with pytest.raises(GenvisError, match="dtype"):
        prepare_images(torch.zeros(2, 1, 16, 16, dtype=torch.int32))


def test_reference_statistics_are_cached(test_split):
    digits_metrics(test_split.images)
    before = _reference_statistics.cache_info()
    digits_metrics(test_split.images[:100])
    after = _reference_statistics.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


def test_evaluate_npz_round_trip(tmp_path, test_split):
    u = ((test_split.images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=u, labels=test_split.labels.numpy())
    metrics = evaluate_npz(path)
    assert metrics["path"] == str(path) and metrics["num"] == 360
    expected = digits_metrics(u, test_split.labels)
    assert metrics["fd"] == expected["fd"] and metrics["class_accuracy"] == expected["class_accuracy"]
    # 8-bit rounding barely moves the features: far below the train-vs-test distance.
    assert 0 <= metrics["fd"] < 1.0 and metrics["class_accuracy"] >= 0.97


def test_evaluate_npz_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(GenvisError, match="arr_0") as err:
        evaluate_npz(bad)
    assert str(bad) in str(err.value)
    wrong = tmp_path / "float.npz"
    np.savez(wrong, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(GenvisError, match="uint8") as err:
        evaluate_npz(wrong)
    assert str(wrong) in str(err.value)
    with pytest.raises(GenvisError, match="not found"):
        evaluate_npz(tmp_path / "missing.npz")


def test_missing_weights_points_to_script(tmp_path):
    with pytest.raises(GenvisError, match="train_digits_classifier.py"):
        load_digits_classifier(tmp_path / "nope.safetensors")


def test_labels_length_checked(test_split):
    with pytest.raises(GenvisError, match="labels"):
        digits_metrics(test_split.images, test_split.labels[:10])


def test_feature_statistics_of_features(model, test_split):
    # digits_metrics' fd equals the FD of statistics computed here from the same features.
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref = feature_statistics(model.features(test_split.images))
        got = feature_statistics(model.features(noise))
    assert digits_metrics(noise)["fd"] == pytest.approx(frechet_distance(*got, *ref), rel=1e-6)
