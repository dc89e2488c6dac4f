"""`genvis eval sample-fid`: the same N images for 1 or 2 processes, and after a SIGKILL + rerun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from genvis.cli import main
from genvis.evaluation.distributed import label_list

ROOT = Path(__file__).resolve().parents[2]

ARGS = ["--sampler", "ddim", "--steps", "4", "--precision", "fp32", "--batch-size", "3", "--shard-size", "4",
        "--labels", "uniform", "--seed", "5"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_dit, save_model):
    model = random_dit(0, depth=2, learn_sigma=False, prediction_type="v")
    return save_model(model, tmp_path_factory.mktemp("m") / "model")


def cli(*args):
    return [sys.executable, "-m", "genvis", "eval", "sample-fid", *map(str, args)]


def test_one_process_equals_two_and_matches_generate(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8))
    metric_args = ["--ref", str(ref), "--features", "digits", "--metrics", "fid,kid,prc,isc,sfid"]
    assert main(["eval", "sample-fid", str(model_dir), "--num-samples", "18", "--out", str(tmp_path / "one"), *ARGS, *metric_args]) == 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    # the README's torchrun line as a user types it: no genvis flag is a prefix of a torchrun option
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                           "-m", "genvis", "eval", "sample-fid", str(model_dir), "--num-samples", "18",
                           "--out", str(tmp_path / "two"), *ARGS, *metric_args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[process 1]" in proc.stdout  # both processes sampled shards
    one, two = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert one["arr_0"].shape == (18, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert np.array_equal(one["labels"], label_list(18, 10, "uniform", 5))
    # sample i is generate()'s sample i, whatever the shard and batch it fell in
    from genvis import load_model
    from genvis.generate import generate, to_uint8

    images = generate(load_model(model_dir), None, torch.from_numpy(one["labels"]), seed=5, sampler="ddim", steps=4,
                      precision="fp32", batch_size=18)
    assert np.array_equal(np.repeat(to_uint8(images), 3, axis=-1), one["arr_0"])
    # features extracted per shard by each process and gathered: the same metrics for 1 and 2 processes,
    # and the metrics of `genvis eval fid` on the assembled file
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    keys = ("frechet_inception_distance", "kernel_inception_distance_mean", "precision", "recall", "inception_score_mean",
            "spatial_frechet_inception_distance")
    assert all(m1[k] == m2[k] for k in keys), (m1, m2)
    capsys.readouterr()
    assert main(["eval", "fid", str(tmp_path / "one" / "samples.npz"), *metric_args]) == 0
    direct = json.loads(capsys.readouterr().out)
    for k in keys:
        assert abs(direct[k] - m1[k]) <= 1e-5 * max(1.0, abs(m1[k])), (k, direct[k], m1[k])
    assert m1["num_samples"] == 18


def test_sigkill_then_rerun_equals_uninterrupted(model_dir, tmp_path):
    common = ["--num-samples", "80", *ARGS[:-2], "--seed", "5", "--steps", "60"]
    assert main(["eval", "sample-fid", str(model_dir), "--out", str(tmp_path / "full"), *common]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(model_dir, "--out", killed, *common), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def shards():
        return len(list((killed / "shards").glob("shard_*.npz"))) if (killed / "shards").exists() else 0

    deadline = time.time() + 120
    while time.time() < deadline and shards() < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before the kill"
    done = sorted(p.name for p in (killed / "shards").glob("shard_*.npz"))
    assert 2 <= len(done) < 20 and not (killed / "samples.npz").exists()
    assert main(["eval", "sample-fid", str(model_dir), "--out", str(killed), *common]) == 0
    a, b = np.load(tmp_path / "full" / "samples.npz"), np.load(killed / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert not list(killed.glob(".*")) and not list((killed / "shards").glob(".*"))  # no temporary files left


def test_other_settings_on_an_existing_run_are_refused(model_dir, tmp_path, capsys):
    assert main(["eval", "sample-fid", str(model_dir), "--num-samples", "4", "--out", str(tmp_path / "r"), *ARGS]) == 0
    capsys.readouterr()
    assert main(["eval", "sample-fid", str(model_dir), "--num-samples", "4", "--out", str(tmp_path / "r"), *ARGS[:-1], "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed: 5 -> 6" in err[0]
    assert main(["eval", "sample-fid", str(model_dir), "--num-samples", "4", "--out", str(tmp_path / "x"), "--labels", "even"]) == 2


def test_rerun_with_other_metrics_extracts_features_again(model_dir, tmp_path, monkeypatch):
    """Feature files record the extractor, feature names and weights they were made with: a rerun asking
    for IS too re-extracts (and gives a fresh run's numbers); --inception-weights does not apply to digits.
    The rerun of a finished run neither loads the generator nor rewrites samples.npz."""
    import genvis.models

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(1).integers(0, 256, size=(20, 8, 8, 3), dtype=np.uint8))
    common = ["--num-samples", "8", *ARGS, "--ref", str(ref), "--features", "digits", "--inception-weights", str(tmp_path / "none.pth")]
    assert main(["eval", "sample-fid", str(model_dir), "--out", str(tmp_path / "a"), *common, "--metrics", "fid"]) == 0
    stamp = (tmp_path / "a" / "samples.npz").stat().st_mtime_ns

    def no_generator(*args, **kwargs):
        raise AssertionError("a finished run loaded the generator again")

    with monkeypatch.context() as patch:
        patch.setattr(genvis.models, "load_model", no_generator)
        assert main(["eval", "sample-fid", str(model_dir), "--out", str(tmp_path / "a"), *common, "--metrics", "fid,isc"]) == 0
    assert (tmp_path / "a" / "samples.npz").stat().st_mtime_ns == stamp
    assert main(["eval", "sample-fid", str(model_dir), "--out", str(tmp_path / "b"), *common, "--metrics", "fid,isc"]) == 0
    rerun, fresh = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    for key in ("frechet_inception_distance", "inception_score_mean", "inception_score_std"):
        assert rerun[key] == fresh[key], key


def test_assemble_rebuilds_after_a_shard_changes(tmp_path):
    """samples.npz is kept on a rerun only if written after every shard; a changed shard or a truncated
    samples.npz is assembled again, and a shard holding other indices is refused."""
    from genvis.errors import GenvisError
    from genvis.evaluation.distributed import assemble, shard_path
    from genvis.io import write_npz_atomic

    labels = np.arange(8) % 3
    (tmp_path / "shards").mkdir()

    def write_shard(k, value, indices=None):
        idx = np.arange(4 * k, 4 * k + 4) if indices is None else indices
        write_npz_atomic(shard_path(tmp_path, k), arr_0=np.full((4, 2, 2, 3), value, np.uint8), labels=labels[4 * k : 4 * k + 4],
                         indices=idx)

    write_shard(0, 1)
    write_shard(1, 2)
    target = assemble(tmp_path, labels, 4)
    stamp = target.stat().st_mtime_ns
    assert assemble(tmp_path, labels, 4).stat().st_mtime_ns == stamp  # unchanged shards: kept as is
    write_shard(1, 99)
    os.utime(shard_path(tmp_path, 1), ns=(stamp + 10**9, stamp + 10**9))  # later than samples.npz
    with np.load(assemble(tmp_path, labels, 4)) as f:
        assert (f["arr_0"][:4] == 1).all() and (f["arr_0"][4:] == 99).all()
    target.write_bytes(target.read_bytes()[:100])  # truncated by hand: rebuilt, not a traceback
    with np.load(assemble(tmp_path, labels, 4)) as f:
        assert (f["arr_0"][4:] == 99).all() and np.array_equal(f["labels"], labels)
    write_shard(1, 99, indices=np.arange(8, 12))
    with pytest.raises(GenvisError, match="other samples"):
        assemble(tmp_path, labels, 4)


def test_sample_fid_reads_the_run_sample_defaults_like_sample(model_dir, tmp_path, capsys):
    """A run directory's sample: section is the default of both commands; flags override it field by field."""
    import shutil

    from genvis.config import load_config, to_yaml

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    cfg = load_config(str(ROOT / "configs" / "digits" / "dit.yaml"), [
        f"output_dir={run}", "sample.sampler=unipc", "sample.steps=3", "sample.cfg=2.5", "sample.cfg_interval=[0.1,0.9]",
        "sample.options.order=2"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert main(["eval", "sample-fid", str(run), "--num-samples", "6", "--out", str(tmp_path / "sf"), "--precision", "fp32",
                 "--labels", "balanced"]) == 0
    assert main(["sample", str(run), "--num-samples", "6", "--out", str(tmp_path / "s.npz"), "--precision", "fp32"]) == 0
    a, b = np.load(tmp_path / "sf" / "samples.npz"), np.load(tmp_path / "s.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"])
    recorded = json.loads((tmp_path / "sf" / "run.json").read_text())
    assert (recorded["sampler"], recorded["steps"], recorded["cfg"], recorded["cfg_interval"], recorded["options"]) == (
        "unipc", 3, 2.5, [0.1, 0.9], {"order": 2})
    # the flags sample-fid used to lack, and --sampler dropping the run's unipc options
    assert main(["eval", "sample-fid", str(run), "--num-samples", "6", "--out", str(tmp_path / "sf2"), "--precision", "fp32",
                 "--labels", "balanced", "--sampler", "ddim", "--cfg-schedule", "linear", "--cache-refresh", "2",
                 "--cache-keep-blocks", "1", "--stitch-small", str(model_dir), "--stitch-fraction", "0.5"]) == 0
    recorded = json.loads((tmp_path / "sf2" / "run.json").read_text())
    assert (recorded["sampler"], recorded["options"], recorded["cfg_schedule"], recorded["cache_refresh"]) == ("ddim", {}, "linear", 2)
    assert not np.array_equal(np.load(tmp_path / "sf2" / "samples.npz")["arr_0"], a["arr_0"])
