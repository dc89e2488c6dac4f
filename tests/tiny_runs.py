"""Tiny-width overrides of the digits presets, shared by the training tests (tests/ is on sys.path through
its conftest)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MSVQ = str(ROOT / "configs" / "digits" / "msvq.yaml")
# tiny widths; usage decays fast and the threshold is high so that dead codes restart within a few steps
TINY = ["tokenizer.ch=16", "tokenizer.norm_groups=8", "tokenizer.z_channels=16", "tokenizer.codebook_size=64",
        "tokenizer.usage_decay=0.5", "tokenizer.restart_threshold=0.5", "task.disc_channels=16", "train.batch_size=16",
        "train.log_every=1", "train.mixed_precision=fp32", "train.keep_checkpoints=0", "train.warmup_steps=0"]
