"""The digits split and DigitsDataset, checked against sklearn's raw arrays."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from genvis.config import DataConfig
from genvis.data import DigitsDataset, build_dataset, load_digits_arrays
from genvis.errors import DataError


def test_split_sizes_disjoint_and_deterministic():
    raw = load_digits()
    train_x, train_y = load_digits_arrays("train")
    test_x, test_y = load_digits_arrays("test")
    all_x, all_y = load_digits_arrays("all")
    assert train_x.shape == (1437, 8, 8) and test_x.shape == (360, 8, 8) and all_x.shape == (1797, 8, 8)
    assert train_x.dtype == np.float32 and train_y.dtype == np.int64
    assert train_x.min() == 0 and train_x.max() == 16

    # Recover which sklearn rows each split took: the split is by index, sorted ascending.
    perm = np.random.RandomState(0).permutation(1797)
    test_idx, train_idx = np.sort(perm[:360]), np.sort(perm[360:])
    assert not set(test_idx) & set(train_idx)
    assert sorted(np.concatenate([test_idx, train_idx])) == list(range(1797))
    np.testing.assert_array_equal(train_x, raw.images[train_idx])
    np.testing.assert_array_equal(test_y, raw.target[test_idx])
    np.testing.assert_array_equal(all_x, raw.images)

    again_x, again_y = load_digits_arrays("test")
    np.testing.assert_array_equal(again_x, test_x)
    np.testing.assert_array_equal(again_y, test_y)
    # All ten classes appear in the held-out split.
    assert set(test_y.tolist()) == set(range(10))


def test_bad_split_names_the_value():
    with pytest.raises(DataError, match="'validation'"):
        load_digits_arrays("validation")


@pytest.mark.parametrize("resolution", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_dataset_shape_and_range(resolution, channels):
    data = DigitsDataset("test", resolution=resolution, channels=channels)
    assert len(data) == 360 and data.num_classes == 10
    assert data.images.shape == (360, channels, resolution, resolution)
    assert data.images.dtype == torch.float32 and data.labels.dtype == torch.int64
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    image, label = data[5]
    assert image.shape == (channels, resolution, resolution) and isinstance(label, int)
    if channels == 3:
        torch.testing.assert_close(data.images[:, 0], data.images[:, 2], rtol=0, atol=0)


def test_resolution_8_is_raw_values():
    raw_x, raw_y = load_digits_arrays("train")
    data = DigitsDataset("train", resolution=8)
    np.testing.assert_array_equal(data.images[:, 0].numpy(), raw_x / 8.0 - 1.0)
    np.testing.assert_array_equal(data.labels.numpy(), raw_y)


def test_resolution_16_is_bilinear_upsampling():
    raw_x, _ = load_digits_arrays("test")
    data = DigitsDataset("test", resolution=16)
    # Half-pixel bilinear by hand for one interior output pixel: output (y, x) = (5, 6)
    # samples input coordinates ((5 + .5) / 2 - .5, (6 + .5) / 2 - .5) = (2.25, 2.75).
    a = raw_x[0] / 8.0 - 1.0
    expected = (0.75 * (0.25 * a[2, 2] + 0.75 * a[2, 3]) + 0.25 * (0.25 * a[3, 2] + 0.75 * a[3, 3]))
    assert data.images[0, 0, 5, 6].item() == pytest.approx(expected, abs=1e-6)
    # Corner pixels clamp to the source corner.
    assert data.images[0, 0, 0, 0].item() == pytest.approx(a[0, 0], abs=1e-6)


def test_flip_index_contract():
    data = DigitsDataset("train", resolution=16)
    image, label = data[3]
    flipped, flipped_label = data[(3, True)]
    same, _ = data[(3, False)]
    assert label == flipped_label == int(data.labels[3])
    torch.testing.assert_close(same, image, rtol=0, atol=0)
        # Mirror by hand: column j of the flip is column R-1-j of the original.
    assert torch.equal(flipped[0, :, 0], image[0, :, 15])
    assert not torch.equal(flipped, image)
    # Indexing never changes the stored tensor.
    torch.testing.assert_close(data[3][0], image, rtol=0, atol=0)


def test_build_dataset_from_config():
    data = build_dataset(DataConfig(name="digits", resolution=8, channels=3), split="test")
    assert isinstance(data, DigitsDataset) and data.images.shape == (360, 3, 8, 8)
