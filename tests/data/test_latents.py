"""LatentsDataset on folders written here by hand in the documented layout (latents.json + safetensors shards):
it returns the stored tensors and flips, and a broken folder is one DataError line naming the file."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genvis.data import DataConfig, DigitsDataset, ImageFolderDataset, LatentsDataset, build_dataset
from genvis.errors import DataError

N, SHARD, SHAPE = 7, 3, (4, 2, 2)  # shards of 3, 3 and 1 items


def write_folder(path, flip=True, num_classes=5):
    """A latents folder of seeded random latents and flipped latents, item i labelled i % num_classes."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((N,) + SHAPE, generator=g)
    flipped = torch.randn((N,) + SHAPE, generator=g)
    labels = torch.arange(N) % num_classes
    for k, start in enumerate(range(0, N, SHARD)):
        stop = min(start + SHARD, N)
        tensors = {"latents": latents[start:stop].clone(), "labels": labels[start:stop].clone(),
                   "indices": torch.arange(start, stop)}
        if flip:
            tensors["latents_flipped"] = flipped[start:stop].clone()
        (path / "shards").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "shards" / f"shard_{k:06d}.safetensors"))
    record = {"format_version": 1, "tokenizer": "/models/vae", "tokenizer_class": "AutoencoderKL",
              "data": {"name": "digits", "path": None, "resolution": 16, "channels": 3}, "split": "train",
              "num_items": N, "num_classes": num_classes, "latent_shape": list(SHAPE), "flip": flip,
              "shard_size": SHARD, "num_shards": 3}
    (path / "latents.json").write_text(json.dumps(record))
    return latents, flipped, labels


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_returns_the_stored_latents_labels_and_flips(tmp_path):
    latents, flipped, labels = write_folder(tmp_path)
    dataset = build_dataset(DataConfig(name="latents", path=str(tmp_path)))
    assert isinstance(dataset, LatentsDataset)
    assert len(dataset) == N and dataset.num_classes == 5 and dataset.item_shape == SHAPE
    assert dataset.encoded_by == "/models/vae" and dataset.flip is True
    for i in range(N):  # across the shard boundaries 2|3 and 5|6
        latent, label = dataset[i]
        assert latent.dtype == torch.float32 and torch.equal(latent, latents[i]) and label == int(labels[i])
        assert isinstance(label, int) and dataset[(i, False)][1] == label
        assert torch.equal(dataset[(i, False)][0], latents[i])
        assert torch.equal(dataset[(i, True)][0], flipped[i]) and dataset[(i, True)][1] == label
    assert torch.equal(dataset.labels, labels)


def test_flip_without_stored_flips_is_one_line(tmp_path):
    latents, _, _ = write_folder(tmp_path, flip=False)
    dataset = LatentsDataset(tmp_path)
    assert dataset.latents_flipped is None and torch.equal(dataset[4][0], latents[4])
    with pytest.raises(DataError) as err:
        dataset[(4, True)]
    assert "re-extract with --flip or set data.random_flip=false" in one_line(err) and str(tmp_path) in one_line(err)


def test_missing_shard_is_one_line_naming_it(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "shards" / "shard_000001.safetensors").unlink()
    with pytest.raises(DataError) as err:
        LatentsDataset(tmp_path)
    assert str(tmp_path / "shards" / "shard_000001.safetensors") in one_line(err) and "missing" in one_line(err)


def test_truncated_shard_is_one_line_naming_it(tmp_path):
    write_folder(tmp_path)
    shard = tmp_path / "shards" / "shard_000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError) as err:
        LatentsDataset(tmp_path)
    assert str(shard) in one_line(err) and "not a readable safetensors shard" in one_line(err)


@pytest.mark.parametrize("change,needle", [
    (lambda t: t.pop("labels"), "no 'labels' tensor"),
    (lambda t: t.pop("latents_flipped"), "no 'latents_flipped' tensor"),
    (lambda t: t.update(latents=t["latents"][:2].clone()), "'latents' is float32 [2, 4, 2, 2], expected float32 [3, 4, 2, 2]"),
    (lambda t: t.update(labels=t["labels"].int()), "'labels' is int32 [3], expected int64 [3]"),
    (lambda t: t.update(indices=t["indices"] + 1), "holds other indices than shard 1 (3..5)"),
])
def test_shard_with_other_contents_is_one_line(tmp_path, change, needle):
    write_folder(tmp_path)
    shard = tmp_path / "shards" / "shard_000001.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard))
    with pytest.raises(DataError) as err:
        LatentsDataset(tmp_path)
    assert str(shard) in one_line(err) and needle in one_line(err)


def test_folder_without_record_or_path_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        LatentsDataset(tmp_path)
    assert str(tmp_path / "latents.json") in one_line(err) and "extract_latents" in one_line(err)
    with pytest.raises(DataError, match="data.path: the latents dataset needs"):
        build_dataset(DataConfig(name="latents"))
    write_folder(tmp_path)
    record = json.loads((tmp_path / "latents.json").read_text())
    (tmp_path / "latents.json").write_text(json.dumps({**record, "num_shards": 2}))
    with pytest.raises(DataError, match="num_shards 2 does not fit num_items 7 in shards of 3"):
        LatentsDataset(tmp_path)
    del record["latent_shape"]
    (tmp_path / "latents.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="missing latent_shape"):
        LatentsDataset(tmp_path)


def test_image_datasets_declare_item_shape_and_no_tokenizer(tmp_path):
    digits = DigitsDataset("test", resolution=12, channels=3)
    assert digits.item_shape == (3, 12, 12) == tuple(digits[0][0].shape) and digits.encoded_by is None
    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 30), (10, 200, 30)).save(tmp_path / "a" / "x.png")
    folder = ImageFolderDataset(tmp_path, resolution=8, channels=1)
    assert folder.item_shape == (1, 8, 8) == tuple(folder[0][0].shape) and folder.encoded_by is None
