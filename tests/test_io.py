"""Atomic writes: a temporary name renamed into place, nothing left behind on error, and the file mode a
plain write would give under the process umask (mkstemp alone gives 0600)."""
import os
import stat

import numpy as np
import pytest

from genvis.generate import save_grid, save_samples
from genvis.io import atomic_dir, atomic_path, write_json_atomic, write_npz_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_plain_write_mode(tmp_path, umask):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what a plain write gives under this umask
    expected_file = 0o666 & ~umask
    assert mode(plain) == expected_file
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_npz_atomic(tmp_path / "a.npz", arr_0=np.zeros(2))
    images = np.zeros((3, 4, 4, 1), np.uint8)
    save_grid(images, tmp_path / "g.png")
    save_samples(images, np.arange(3), tmp_path / "s.npz")
    save_samples(images, np.arange(3), tmp_path / "pngs")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    for name in ("a.txt", "a.json", "a.npz", "g.png", "s.npz", "pngs/000000.png", "pngs/samples.json"):
        assert mode(tmp_path / name) == expected_file, name
    plain_dir = tmp_path / "plain_dir"
    plain_dir.mkdir()
    assert mode(tmp_path / "folder") == mode(tmp_path / "pngs") == mode(plain_dir)


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
