"""Fixtures shared by the training tests: one tiny digits multi-scale VQ tokenizer run, trained once."""
import pytest

from cli_run import train
from tiny_runs import MSVQ, TINY


@pytest.fixture(scope="session")
def tiny_msvq(tmp_path_factory):
    """The digits multi-scale VQ preset at a tiny width (64 codes of dim 16, scales 1,2,3,4): 30 steps, the
    discriminator from step 15. Returns (run directory, its stdout)."""
    run = tmp_path_factory.mktemp("msvq") / "run"
    stdout = train(MSVQ, run, *TINY, "train.steps=30", "train.checkpoint_every=0", "task.disc_start=15")
    return run, stdout
