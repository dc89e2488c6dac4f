"""ADM centre crop against hand-computed pixels; ImageFolderDataset on folders written here."""
import numpy as np
import pytest
import torch
from PIL import Image

from genvis.config import DataConfig
from genvis.data import ImageFolderDataset, build_dataset
from genvis.data.transforms import center_crop_arr
from genvis.errors import DataError


def test_center_crop_box_halving_then_centre():
    # 40 wide x 20 high, resolution 10: 20 >= 2 * 10, so one BOX halving to 20 x 10; the short
    # side is then already 10 (BICUBIC at scale 1 is the identity); crop x from (20 - 10) // 2 = 5.
    y, x = np.mgrid[0:20, 0:40]
    # Each 2x2 block has mean 6 * (x // 2) + 2 * (y // 2) + 2 exactly, so BOX is exact.
    pattern = 6 * (x // 2) + 2 * (y // 2) + 2 * (x % 2) + 2 * (y % 2)
    out = center_crop_arr(Image.fromarray(pattern.astype(np.uint8), mode="L"), 10)
    i, j = np.mgrid[0:10, 0:10]
    expected = 6 * (j + 5) + 2 * i + 2
    assert out.dtype == np.uint8 and out.shape == (10, 10)
    np.testing.assert_array_equal(out, expected)


def test_center_crop_bicubic_sizes_and_rgb():
    # 25 x 13 -> no halving (13 < 20); scale 10 / 13 -> 19 x 10; crop x from (19 - 10) // 2 = 4.
    # A constant image stays constant through BICUBIC, whatever the offsets.
    image = Image.new("RGB", (25, 13), (200, 10, 90))
    out = center_crop_arr(image, 10)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out, np.broadcast_to(np.array([200, 10, 90], np.uint8), (10, 10, 3)))
    # Tall image, 21 wide x 64 high, resolution 8: one halving (21 >= 16) to 10 x 32, whose rows
    # are 8k + 2 for a source ramp of 4 per row; scale 8 / 10 -> 8 x round(25.6) = 26; crop rows
    # from (26 - 8) // 2 = 9. BICUBIC's symmetric normalised kernel keeps a linear ramp linear
    # away from the border. PIL scales each axis by its own ratio (rows 32 -> 26), so output row
    # r samples source row (r + .5) * 32 / 26 - .5, value 8 * that + 2.
    ramp = np.repeat(np.arange(64, dtype=np.uint8)[:, None] * 4, 21, axis=1)
    out = center_crop_arr(Image.fromarray(ramp, mode="L"), 8)
    assert out.shape == (8, 8)
    rows = np.arange(9, 17)
    expected = np.repeat((8 * ((rows + 0.5) * 32 / 26 - 0.5) + 2)[:, None], 8, axis=1)
    np.testing.assert_allclose(out.astype(int), expected, atol=1)


def _write(path, value, size=(12, 12), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    _write(root / "cat" / "b.png", (255, 255, 255))
    _write(root / "cat" / "a.PNG", (0, 0, 0))  # upper-case extension counts
    _write(root / "ant" / "x.jpg", (51, 51, 51))
    _write(root / "bee" / "deep" / "y.bmp", (102, 0, 255), size=(30, 18))  # found recursively
    (root / "bee" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_labels_order_and_values(folder):
    data = ImageFolderDataset(folder, resolution=6)
    assert data.classes == ["ant", "bee", "cat"] and data.num_classes == 3
    assert [(p.relative_to(folder).as_posix(), y) for p, y in data.samples] == [
        ("ant/x.jpg", 0), ("bee/deep/y.bmp", 1), ("cat/a.PNG", 2), ("cat/b.png", 2)
    ]
    image, label = data[1]
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32 and label == 1
    # Constant colours survive the crop exactly: u / 127.5 - 1.
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([102, 0, 255]) / 127.5 - 1)
    assert data[2][0].eq(-1).all() and data[3][0].eq(1).all()
    # JPEG is lossy; grey 51 -> -0.6 within a couple of levels.
    torch.testing.assert_close(data[0][0], torch.full((3, 6, 6), 51 / 127.5 - 1), atol=3 / 127.5, rtol=0)


def test_image_folder_grey_and_flip(tmp_path):
    root = tmp_path / "grey"
    half = np.zeros((8, 8), np.uint8)
    half[:, :4] = 255  # left half white
    (root / "only").mkdir(parents=True)
    Image.fromarray(half, mode="L").save(root / "only" / "h.png")
    data = ImageFolderDataset(root, resolution=8, channels=1)
    image, label = data[0]
    flipped, _ = data[(0, True)]
    assert image.shape == (1, 8, 8) and label == 0
    assert image[0, :, :4].eq(1).all() and image[0, :, 4:].eq(-1).all()
    assert flipped[0, :, 4:].eq(1).all() and flipped[0, :, :4].eq(-1).all()


def test_corrupt_image_names_the_file(folder):
    bad = folder / "cat" / "c.png"
    bad.write_bytes(np.random.RandomState(0).bytes(300))
    data = ImageFolderDataset(folder, resolution=6)
    index = [p for p, _ in data.samples].index(bad)
    with pytest.raises(DataError, match="cannot read image") as err:
        data[index]
    assert str(bad) in str(err.value)


def test_empty_folder_errors(tmp_path):
    with pytest.raises(DataError) as err:
        ImageFolderDataset(tmp_path, resolution=8)
    assert str(tmp_path) in str(err.value)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing", resolution=8)


def test_build_dataset_folder(folder):
    data = build_dataset(DataConfig(name="folder", path=str(folder), resolution=6, channels=3), split="test")
    assert isinstance(data, ImageFolderDataset) and len(data) == 4
