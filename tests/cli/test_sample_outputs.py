"""`genvis sample` checks where it will write before sampling, never mixes new images with stale ones,
reports unreadable weights in one line, and counts progress in sampling steps."""
import io
import json
import os
import sys

import pytest

import genvis.generate
from genvis.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_dit, save_model):
    return save_model(random_dit(0), tmp_path_factory.mktemp("m") / "model")


@pytest.fixture()
def no_sampling(monkeypatch):
    """Fails the test if sampling starts: output problems must be found before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the output location was checked")

    monkeypatch.setattr(genvis.generate, "generate", refuse)


def run(model_dir, out, *args):
    return main(["sample", str(model_dir), "--out", str(out), "--num-samples", "3", "--steps", "2", "--precision", "fp32", *args])


def one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("make,out,needle", [
    (lambda d: (d / "file").write_text("x"), "file/samples.npz", "is a file, not a folder"),
    (lambda d: (d / "file").write_text("x"), "file/deeper/grid.png", "is a file, not a folder"),
    (lambda d: None, "samples.jpg", "does not write .jpg files"),
    (lambda d: None, "grid.png.bak", "does not write .bak files"),
    (lambda d: (d / "adir.png").mkdir(), "adir.png", "is a folder; a grid output needs a file path"),
    (lambda d: (d / "pngs").write_text("x"), "pngs", "exists and is not a folder"),
    (lambda d: ((d / "pngs").mkdir(), (d / "pngs" / "mine.png").write_text("x")), "pngs", "folder is not empty"),
])
def test_bad_output_is_refused_before_sampling(model_dir, tmp_path, capsys, no_sampling, make, out, needle):
    make(tmp_path)
    assert run(model_dir, tmp_path / out) == 2
    line = one_error_line(capsys)
    assert needle in line and str(tmp_path / out) in line


def test_unwritable_output_location_is_one_line(model_dir, tmp_path, capsys, no_sampling, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert run(model_dir, tmp_path / "x.npz") == 2
    line = one_error_line(capsys)
    assert "cannot write the samples" in line and "Read-only file system" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line(model_dir, tmp_path, capsys, no_sampling):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    assert run(model_dir, tmp_path / "ro" / "x.npz") == 2
    assert "cannot write the samples" in one_error_line(capsys)


def test_png_folder_replaces_only_its_own_earlier_output(model_dir, tmp_path, random_dit, save_model, capsys):
    out = tmp_path / "pngs"
    assert run(model_dir, out, "--num-samples", "4") == 0
    assert run(model_dir, out, "--num-samples", "2") == 0  # the same model's earlier output: replaced whole
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "samples.json"]
    assert json.loads((out / "samples.json").read_text())["labels"] == [0, 1]
    other = save_model(random_dit(3), tmp_path / "other")
    capsys.readouterr()
    assert run(other, out) == 2  # another model's images are never mixed in or removed
    assert "folder is not empty" in one_error_line(capsys)
    (out / "notes.txt").write_text("mine")
    assert run(model_dir, out) == 2  # a file genvis did not write: refused
    assert (out / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".pngs*"))


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_unreadable_weights_are_one_line(model_dir, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert run(broken, tmp_path / "x.npz") == 2
    line = one_error_line(capsys)
    assert str(weights) in line and "not a readable safetensors file" in line


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, where progress bars are drawn."""

    def isatty(self):
        return True


def test_progress_counts_sampling_steps(model_dir, tmp_path, capsys, monkeypatch):
    """4 samples in batches of 2 with 5 steps: the bar runs to 10 steps, not 2 batches; on a terminal only."""
    assert run(model_dir, tmp_path / "quiet.npz", "--num-samples", "4") == 0
    assert "step" not in capsys.readouterr().err  # not a terminal: no carriage-return lines in logs
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run(model_dir, tmp_path / "x.npz", "--num-samples", "4", "--batch-size", "2", "--steps", "5") == 0
    assert "10/10" in terminal.getvalue() and "2 batches" in terminal.getvalue()
