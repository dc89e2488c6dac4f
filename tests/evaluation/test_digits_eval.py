"""The shipped digits classifier, the digits metrics built on it, and `genvis eval digits`."""
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genvis.cli import main
from genvis.data import DigitsDataset
from genvis.errors import GenvisError
from genvis.evaluation import feature_statistics, frechet_distance
from genvis.evaluation.digits import (
    CLASSIFIER_PATH,
    _reference_statistics,
    digits_metrics,
    evaluate_npz,
    evaluate_samples,
    load_digits_classifier,
    prepare_images,
)
from genvis.generate import to_uint8


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


# --- `genvis eval digits`: inputs a new user tries ---------------------------------------------


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars are drawn."""

    def isatty(self):
        return True


def _cli(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys, argv, *expected):
    """The command exits 2 with nothing on stdout and exactly one stderr line holding every `expected`."""
    rc, out, err = _cli(capsys, argv)
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genvis eval: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in err and "pickle" not in err
    return lines[0]


def _test_split_u8(resolution=16):
    split = DigitsDataset("test", resolution=resolution)
    return to_uint8(split.images), split.labels.numpy()  # uint8 [360, R, R, 1], int64 [360]


def _write_pngs(folder, images_nhwc, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:06d}.png" for i in range(len(images_nhwc))]
    for name, image in zip(names, images_nhwc):
        Image.fromarray(image[..., 0]).save(folder / name)
    return names


@pytest.mark.parametrize("kind", ["text", "png", "npy"])
def test_cli_file_that_is_not_an_npz(capsys, tmp_path, kind):
    path = tmp_path / {"text": "notes.txt", "png": "one.png", "npy": "images.npy"}[kind]
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "png":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    else:
        np.save(path, np.zeros((4, 16, 16, 3), np.uint8))
    line = _refused(capsys, ["eval", "digits", str(path)], str(path), "not an .npz archive", "arr_0 uint8 [N, H, W, C]",
                    "labels", "folder of PNG images")
    assert ("(it is a PNG image)" in line) == (kind == "png") and ("(it is a bare .npy array)" in line) == (kind == "npy")


def test_cli_png_folder_with_manifest_matches_npz(capsys, tmp_path):
    """A PNG folder scores exactly as an .npz of the same images; samples.json's labels belong to the files
    it names, whatever order it lists them in; without a manifest there is no class_accuracy."""
    u8, labels = _test_split_u8()
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=np.repeat(u8, 3, axis=-1), labels=labels)
    folder = tmp_path / "samples"
    names = _write_pngs(folder, u8)
    rc, out, err = _cli(capsys, ["eval", "digits", str(folder)])
    assert rc == 0 and err == "", err  # stderr is not a terminal here: no progress bar either
    no_manifest = json.loads(out)
    order = np.random.RandomState(0).permutation(len(names))  # listed out of file-name order
    (folder / "samples.json").write_text(json.dumps({"labels": labels[order].tolist(), "files": [names[i] for i in order],
                                                     "sampler": "euler", "steps": 10}))
    rc, out, err = _cli(capsys, ["eval", "digits", str(folder)])
    assert rc == 0, err
    from_folder = json.loads(out)
    rc, out, err = _cli(capsys, ["eval", "digits", str(npz)])
    assert rc == 0, err
    from_npz = json.loads(out)
    assert from_folder["path"] == str(folder) and from_folder["num"] == from_npz["num"] == 360
    assert from_folder["fd"] == pytest.approx(from_npz["fd"], rel=1e-9, abs=1e-12) and 0 <= from_npz["fd"] < 1.0
    assert from_folder["class_accuracy"] == from_npz["class_accuracy"] >= 0.97  # a wrong pairing would give ~0.1
    assert set(no_manifest) == {"fd", "num", "path"} and no_manifest["fd"] == from_folder["fd"]


def _manifest_missing_file(names, labels):
    return {"labels": labels[:-1], "files": names[:-1]}, names[-1]


def _manifest_extra_file(names, labels):
    return {"labels": labels + [1], "files": names + ["000099.png"]}, "000099.png"


def _manifest_lengths_differ(names, labels):
    return {"labels": labels[:-1], "files": names}, "3 labels for 4 files"


def _manifest_duplicate(names, labels):
    return {"labels": labels, "files": names[:3] + names[:1]}, f"lists {names[0]} twice"


def _manifest_label_out_of_range(names, labels):
    return {"labels": labels[:2] + [12] + labels[3:], "files": names}, f"value 12 at index 2 ({names[2]})"


def _manifest_label_huge(names, labels):
    return {"labels": [10**30] + labels[1:], "files": names}, f"value {10**30} at index 0 ({names[0]})"


def _manifest_label_not_int(names, labels):
    return {"labels": labels[:1] + ["7"] + labels[2:], "files": names}, "value '7' at index 1"


def _manifest_without_files(names, labels):
    return {"labels": labels}, "key 'files' missing"


def _manifest_not_json(names, labels):
    return "{labels: [1, 2", "not readable as JSON"


@pytest.mark.parametrize("make", [_manifest_missing_file, _manifest_extra_file, _manifest_lengths_differ,
                                  _manifest_duplicate, _manifest_label_out_of_range, _manifest_label_huge,
                                  _manifest_label_not_int, _manifest_without_files, _manifest_not_json])
def test_cli_manifest_not_matching_folder(capsys, tmp_path, make):
    u8, labels = _test_split_u8()
    folder = tmp_path / "samples"
    names = _write_pngs(folder, u8[:4])
    manifest, expected = make(names, labels[:4].tolist())
    (folder / "samples.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    _refused(capsys, ["eval", "digits", str(folder)], str(folder / "samples.json"), expected)


def test_cli_labels_outside_classes(capsys, tmp_path):
    u8, labels = _test_split_u8()
    for bad, index in ((10, 5), (-1, 7)):
        wrong = labels.copy()
        wrong[index], wrong[index + 50] = bad, 11  # the first bad value is named
        path = tmp_path / f"labels{bad}.npz"
        np.savez(path, arr_0=u8, labels=wrong)
        _refused(capsys, ["eval", "digits", str(path)], str(path), f"'labels' value {bad} at index {index}", "0..9")
    with pytest.raises(GenvisError, match="labels value 11 at index 3: expected digit classes 0..9"):
        digits_metrics(u8[:10], np.array([0, 1, 2, 11, 4, 5, 6, 7, 8, 9]))
    with pytest.raises(GenvisError, match="labels is float32"):
        digits_metrics(u8[:10], np.arange(10, dtype=np.float32))


def test_sizes_from_native_8_accepted_smaller_refused(capsys, tmp_path):
    """The test split rendered at 8 (native), 16 and 32 scores ~0 against the reference rendered the same
    way (float exactly, 8-bit files up to rounding, far below real train digits' ~45-48); below 8x8 the
    rendering destroys the digits, so 1x1 and 4x4 (where noise used to score fd 23) are refused."""
    scores = []
    for resolution in (8, 16, 32):
        split = DigitsDataset("test", resolution=resolution)
        assert abs(digits_metrics(split.images, split.labels)["fd"]) < 1e-6
        u8, labels = _test_split_u8(resolution)
        path = tmp_path / f"test{resolution}.npz"
        np.savez(path, arr_0=u8, labels=labels)
        rc, out, err = _cli(capsys, ["eval", "digits", str(path)])
        assert rc == 0, err
        result = json.loads(out)
        train_fd = digits_metrics(DigitsDataset("train", resolution=resolution).images)["fd"]
        scores.append(f"R={resolution}: 8-bit test split fd {result['fd']:.4g}, train split fd {train_fd:.4g}")
        assert 0 <= result["fd"] < 0.05 and train_fd > 40 and result["class_accuracy"] >= 0.97
    noise = np.random.RandomState(0).randint(0, 256, size=(360, 1, 1, 3), dtype=np.uint8)
    for size in (1, 4):
        path = tmp_path / f"noise{size}.npz"
        np.savez(path, arr_0=np.ascontiguousarray(np.broadcast_to(noise, (360, size, size, 3))))
        _refused(capsys, ["eval", "digits", str(path)], str(path), f"images of size {size}x{size}", "at least 8x8")
        folder = tmp_path / f"noise{size}"
        _write_pngs(folder, np.broadcast_to(noise[:5, ..., :1], (5, size, size, 1)))
        _refused(capsys, ["eval", "digits", str(folder)], str(folder), f"images of size {size}x{size}", "at least 8x8")
        with pytest.raises(GenvisError, match=f"images of size {size}x{size}: expected square images of at least 8x8"):
            digits_metrics(torch.zeros(4, 1, size, size))
    print("; ".join(scores))  # after the last CLI call: capsys would read it as the command's output


def test_cli_too_few_images(capsys, tmp_path):
    for n in (0, 1):
        path = tmp_path / f"n{n}.npz"
        np.savez(path, arr_0=np.zeros((n, 16, 16, 3), np.uint8), labels=np.zeros(n, np.int64))
        _refused(capsys, ["eval", "digits", str(path)], str(path), f"holds {n} image(s); expected at least 2")
        with pytest.raises(GenvisError, match=f"^{n} image\\(s\\); expected at least 2"):
            digits_metrics(torch.zeros(n, 1, 16, 16))
    one = tmp_path / "one"
    _write_pngs(one, np.zeros((1, 16, 16, 1), np.uint8))
    _refused(capsys, ["eval", "digits", str(one)], str(one), "1 image(s); expected at least 2")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(capsys, ["eval", "digits", str(empty)], str(empty), "no images found")
    _refused(capsys, ["eval", "digits", str(tmp_path / "missing")], str(tmp_path / "missing"), "not found")


def test_progress_bar_in_cli_only(capsys, monkeypatch, tmp_path):
    """`genvis eval digits` draws a bar of the classifier batches (with the total) on a terminal; the Python API
    stays quiet unless asked."""
    u8, labels = _test_split_u8()
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=u8, labels=labels)
    folder = tmp_path / "samples"
    _write_pngs(folder, u8)
    for samples in (path, folder):
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main(["eval", "digits", str(samples)]) == 0
        assert "digits classifier" in terminal.getvalue() and "360/360" in terminal.getvalue()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    quiet = [evaluate_samples(path), evaluate_samples(folder), evaluate_npz(path), digits_metrics(u8, labels)]
    assert terminal.getvalue() == ""
    assert len({m["fd"] for m in quiet}) <= 2 and quiet[0]["fd"] == quiet[2]["fd"] == quiet[3]["fd"]
    digits_metrics(u8, labels, progress=True, batch_size=100)
    assert "360/360" in terminal.getvalue()
