"""extract_latents: the shards hold the tokenizer's encoding of every dataset image (and of its mirror image),
the same files for 1 or 2 processes and after a SIGKILL + rerun, and a rerun with other settings is refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genvis import load_tokenizer
from genvis.data import DataConfig, DigitsDataset, build_dataset
from genvis.errors import GenvisError
from genvis.tokenizers.extract import extract_latents
from test_tokenizers import tiny_vae

ROOT = Path(__file__).resolve().parents[2]
DIGITS = DataConfig(name="digits", resolution=16, channels=3)
SCRIPT = """
import sys
from accelerate import PartialState
from genvis.data import DataConfig
from genvis.tokenizers.extract import extract_latents

vae, out, split, shard_size, batch_size = sys.argv[1:]
extract_latents(vae, DataConfig(name="digits", resolution=16, channels=3), out, split=split, flip=True,
                shard_size=int(shard_size), batch_size=int(batch_size))
state = PartialState()
print(f"process {state.process_index} of {state.num_processes} done", flush=True)
"""


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread, as the scripts do (OMP_NUM_THREADS=1): the 2 shared test cores are
    not oversubscribed, and the files are compared with those of the scripts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae(scaling_factor=0.5, shift_factor=0.1).save_pretrained(str(path))
    return path


@pytest.fixture()
def script(tmp_path):
    path = tmp_path / "extract.py"
    path.write_text(SCRIPT)
    return path


def shard_files(out):
    return sorted((out / "shards").glob("shard_*.safetensors"))


def same_files(a, b):
    names = [p.name for p in shard_files(a)]
    return names == [p.name for p in shard_files(b)] and all(
        (a / "shards" / n).read_bytes() == (b / "shards" / n).read_bytes() for n in names)


def test_latents_are_the_tokenizer_encoding_of_every_image(vae_dir, tmp_path):
    out = extract_latents(vae_dir, DIGITS, tmp_path / "lat", flip=True, batch_size=32, shard_size=100, split="test")
    assert out == tmp_path / "lat"
    assert [p.name for p in shard_files(out)] == [f"shard_{k:06d}.safetensors" for k in range(4)]  # 100, 100, 100, 60
    record = json.loads((out / "latents.json").read_text())
    assert record == {"format_version": 1, "tokenizer": str(vae_dir.resolve()), "tokenizer_class": "AutoencoderKL",
                      "data": {"name": "digits", "path": None, "resolution": 16, "channels": 3}, "split": "test",
                      "num_items": 360, "num_classes": 10, "latent_shape": [4, 8, 8], "flip": True, "shard_size": 100,
                      "num_shards": 4}
    shards = [load_file(str(p)) for p in shard_files(out)]
    assert [s["latents"].shape[0] for s in shards] == [100, 100, 100, 60]
    assert all(s["latents"].dtype == torch.float32 and s["labels"].dtype == torch.int64 for s in shards)
    latents, flipped, labels, indices = (torch.cat([s[k] for s in shards]) for k in ("latents", "latents_flipped", "labels", "indices"))

    digits = DigitsDataset("test", resolution=16, channels=3)
    tok = load_tokenizer(vae_dir)
    expected = tok.encode(digits.images)  # one batch of 360: equal to the shards' batches of 32 up to rounding
    expected_flipped = tok.encode(torch.flip(digits.images, dims=[-1]))
    assert latents.shape == (360, 4, 8, 8) and expected.abs().mean() > 0.05
    assert torch.allclose(latents, expected, atol=1e-5, rtol=0)
    assert torch.allclose(flipped, expected_flipped, atol=1e-5, rtol=0)
    assert (flipped - torch.flip(latents, dims=[-1])).abs().max() > 0.01  # a random VAE is not mirror-symmetric
    assert torch.equal(labels, digits.labels) and torch.equal(indices, torch.arange(360))
    # the plain latents are the same bits whether or not flips are stored
    plain = extract_latents(vae_dir, DIGITS, tmp_path / "plain", batch_size=32, shard_size=100, split="test")
    assert torch.equal(torch.cat([load_file(str(p))["latents"] for p in shard_files(plain)]), latents)
    assert "latents_flipped" not in load_file(str(shard_files(plain)[0]))

    # read back as the training data
    dataset = build_dataset(DataConfig(name="latents", path=str(out)))
    assert len(dataset) == 360 and dataset.num_classes == 10 and dataset.item_shape == (4, 8, 8)
    assert dataset.encoded_by == str(vae_dir.resolve())
    for i in (0, 99, 100, 359):
        assert torch.equal(dataset[i][0], latents[i]) and dataset[i][1] == int(digits.labels[i])
        assert torch.equal(dataset[(i, True)][0], flipped[i]) and dataset[(i, True)][1] == int(digits.labels[i])

    # a rerun of a finished folder writes nothing
    stamps = [p.stat().st_mtime_ns for p in shard_files(out)]
    extract_latents(vae_dir, DIGITS, out, flip=True, batch_size=32, shard_size=100, split="test")
    assert [p.stat().st_mtime_ns for p in shard_files(out)] == stamps


def test_one_process_equals_two(vae_dir, tmp_path, script):
    extract_latents(vae_dir, DIGITS, tmp_path / "one", flip=True, shard_size=100, batch_size=32, split="test")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                          str(script), str(vae_dir), str(tmp_path / "two"), "test", "100", "32"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "process 0 of 2 done" in two.stdout and "process 1 of 2 done" in two.stdout
    assert len(shard_files(tmp_path / "one")) == 4 and same_files(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "one" / "latents.json").read_text() == (tmp_path / "two" / "latents.json").read_text()


def test_sigkill_then_rerun_equals_uninterrupted(vae_dir, tmp_path, script):
    settings = dict(flip=True, shard_size=12, batch_size=1, split="test")  # 30 shards, one image per encoder call
    extract_latents(vae_dir, DIGITS, tmp_path / "full", **settings)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(vae_dir), str(killed), "test", "12", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((killed / "shards").exists() and shard_files(killed)) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill"
    assert 1 <= len(shard_files(killed)) < 30
    (killed / "shards" / ".shard_000029.safetensors.0123456789ab.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    extract_latents(vae_dir, DIGITS, killed, **settings)
    assert len(shard_files(killed)) == 30 and same_files(tmp_path / "full", killed)
    assert not list(killed.glob(".*")) and not list((killed / "shards").glob(".*"))  # no temporary files left


def test_other_settings_on_rerun_are_refused(vae_dir, tmp_path):
    out = extract_latents(vae_dir, DIGITS, tmp_path / "lat", shard_size=200, split="test")
    before = (out / "latents.json").read_text()
    with pytest.raises(GenvisError) as err:
        extract_latents(vae_dir, DIGITS, out, flip=True, shard_size=100, split="test")
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert "flip: False -> True" in message and "shard_size: 200 -> 100" in message and "num_shards: 2 -> 4" in message
    small = DataConfig(name="digits", resolution=8, channels=3)
    with pytest.raises(GenvisError, match=r"data\.resolution: 16 -> 8.*latent_shape: \[4, 8, 8\] -> \[4, 4, 4\]"):
        extract_latents(vae_dir, small, out, shard_size=200, split="test")
    with pytest.raises(GenvisError, match=r"split: 'test' -> 'train'"):
        extract_latents(vae_dir, DIGITS, out, shard_size=200)
    assert (out / "latents.json").read_text() == before
    # latents are not images to encode again
    with pytest.raises(GenvisError, match="already latents"):
        extract_latents(vae_dir, DataConfig(name="latents", path=str(out)), tmp_path / "again")
