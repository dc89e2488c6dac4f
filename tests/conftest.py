"""Fixtures shared by the test folders."""
import os

# Under pytest-xdist (`make test` runs `pytest -n auto`), each worker and the processes it starts get their share of
# the cores; set before torch loads, as OpenMP reads it then. Oversubscribed OpenMP threads spin at every barrier.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))

import pytest  # noqa: E402
import torch  # noqa: E402

from genvis.models.dit import DiT
from genvis.tokenizers import PixelTokenizer, record_tokenizer

TINY_DIT = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)


@pytest.fixture(scope="session")
def random_dit():
    """make(seed=0, **config) -> a tiny DiT whose trainable weights are N(0, 0.1), so unlike the official
    zero-initialised output layers its samples depend on the labels, the time and the noise."""

    def make(seed: int = 0, **config) -> DiT:
        torch.manual_seed(seed)
        model = DiT(**{**TINY_DIT, **config})
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)
        return model

    return make


@pytest.fixture(scope="session")
def save_model():
    """save(model, path) -> path: a model folder as training exports it, the weights plus the recorded
    pixel tokenizer (so `genvis sample path` needs no --tokenizer)."""

    def save(model, path):
        model.save_pretrained(str(path))
        record_tokenizer(path, PixelTokenizer())
        return path

    return save


@pytest.fixture(scope="session")
def scalars():
    """read(run, tag) -> the values a run logged to TensorBoard under `tag`, in step order."""

    def read(run, tag: str):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        values = []
        for events in sorted(run.glob("logs/**/events.out.tfevents*")):
            acc = EventAccumulator(str(events))
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                values += [e.value for e in acc.Scalars(tag)]
        return values

    return read
