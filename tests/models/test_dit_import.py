"""`genvis import dit`: official DiT files (plain, training checkpoint, DDP / torch.compile prefixes)
become genvis model folders holding exactly the source tensors; bad files fail with one line."""
import argparse
import math

import pytest
import torch

from genvis.cli import main
from genvis.models import load_model

S2 = dict(depth=12, hidden=384, patch=2, in_channels=4, input_size=32, num_classes=1000)


def official_shapes(depth, hidden, patch, in_channels, input_size, num_classes):
    """Key -> shape of an official learn_sigma DiT state dict (REFERENCE.md, "DiT and SiT")."""
    n_patches = (input_size // patch) ** 2
    out_dim = patch * patch * 2 * in_channels
    shapes = {
        "pos_embed": (1, n_patches, hidden),
        "x_embedder.proj.weight": (hidden, in_channels, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (num_classes + 1, hidden),
        "final_layer.linear.weight": (out_dim, hidden),
        "final_layer.linear.bias": (out_dim,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * hidden, hidden), b + "attn.qkv.bias": (3 * hidden,),
            b + "attn.proj.weight": (hidden, hidden), b + "attn.proj.bias": (hidden,),
            b + "mlp.fc1.weight": (4 * hidden, hidden), b + "mlp.fc1.bias": (4 * hidden,),
            b + "mlp.fc2.weight": (hidden, 4 * hidden), b + "mlp.fc2.bias": (hidden,),
            b + "adaLN_modulation.1.weight": (6 * hidden, hidden), b + "adaLN_modulation.1.bias": (6 * hidden,),
        })
    return shapes


@pytest.fixture(scope="module")
def s2_state():
    """A random DiT-S/2 (32x32x4, 1000 classes) state dict in the official layout."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in official_shapes(**S2).items()}


def constant_like(sd, value):
    """Same keys and shapes, one stored float per tensor (stride-0 views keep the file tiny)."""
    return {k: torch.full((1,), float(value)).expand(v.shape) for k, v in sd.items()}


def import_dit(ckpt, out, arch="DiT-S/2"):
    return main(["import", "dit", str(ckpt), str(out), "--arch", arch])


def assert_imported(out, source, capsys):
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "DiT-S/2" in captured.out and "32.96M" in captured.out
    model = load_model(out)
    cfg = model.config
    assert "tokenizer" not in cfg and not (out / "tokenizer").exists() and not (out / "tokenizer.json").exists()
    assert cfg.learn_sigma is True and cfg.input_size == 32 and cfg.num_classes == 1000
    assert cfg.in_channels == 4 and cfg.patch_size == 2
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (12, 384, 6)
    assert cfg.prediction_type == "eps" and cfg.schedule == "linear"
    assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == (1000, 1e-4, 0.02)
    got = model.state_dict()
    assert set(got) == set(source)
    for key, value in source.items():
        assert got[key].dtype == torch.float32 and torch.equal(got[key], value), key
    return model


def test_import_plain_state_dict(tmp_path, s2_state, capsys):
    ckpt = tmp_path / "DiT-S-2.pt"
    torch.save(s2_state, ckpt)
    out = tmp_path / "imported"
    assert import_dit(ckpt, out) == 0
    assert_imported(out, s2_state, capsys)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_import_training_checkpoint_takes_ema(tmp_path, s2_state, capsys):
    ckpt = tmp_path / "0400000.pt"
    opt = {"state": {0: {"step": torch.tensor(400000.0), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "weight_decay": 0, "params": [0]}]}
    torch.save({"model": constant_like(s2_state, -1.0), "ema": s2_state, "opt": opt,
                "args": {"model": "DiT-S/2", "image_size": 256, "global_batch_size": 256}}, ckpt)
    out = tmp_path / "imported"
    assert import_dit(ckpt, out) == 0
    assert_imported(out, s2_state, capsys)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.module."])
def test_import_strips_wrapper_prefixes(tmp_path, s2_state, capsys, prefix):
    ckpt = tmp_path / "wrapped.pt"
    torch.save({"ema": {prefix + k: v for k, v in s2_state.items()}, "args": {"epochs": 1400}}, ckpt)
    out = tmp_path / "imported"
    assert import_dit(ckpt, out) == 0
    assert_imported(out, s2_state, capsys)


def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_import_refuses_pickled_objects(tmp_path, capsys):
    small = {k: torch.zeros(1) for k in ("pos_embed", "x_embedder.proj.weight")}
    ckpt = tmp_path / "needs_pickle.pt"
    torch.save({"ema": small, "args": argparse.Namespace(x=1)}, ckpt)
    out = tmp_path / "imported"
    assert import_dit(ckpt, out) == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line
    assert "weights_only" in line or "pickle" in line
    assert "\x1b" not in line  # no terminal escape codes copied from torch's message
    assert not out.exists()


def test_import_wrong_arch_names_the_mismatch(tmp_path, s2_state, capsys):
    ckpt = tmp_path / "s2.pt"
    torch.save(s2_state, ckpt)
    out = tmp_path / "imported"
    assert import_dit(ckpt, out, arch="DiT-B/2") == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "DiT-B/2" in line
    assert "hidden_size" in line and "384" in line and "768" in line
    # Right width and depth, wrong patch: the shapes cannot match.
    assert import_dit(ckpt, out, arch="DiT-S/4") == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "DiT-S/4" in line
    assert not out.exists()


def test_import_missing_file_and_unknown_arch(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert import_dit(missing, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert str(missing) in line and "not found" in line
    assert import_dit(missing, tmp_path / "out", arch="DiT-M/2") == 2
    assert "DiT-M/2" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_import_not_a_dit_layout(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, ckpt)
    assert import_dit(ckpt, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and "pos_embed" in line


def test_import_checkpoint_without_blocks_fails_in_one_line(tmp_path, capsys):
    """The four keys the importer checks first are present, the transformer blocks are not."""
    shapes = official_shapes(**S2)
    truncated = {k: torch.zeros(s) for k, s in shapes.items() if not k.startswith("blocks.")}
    ckpt = tmp_path / "truncated.pt"
    torch.save(truncated, ckpt)
    assert import_dit(ckpt, tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert str(ckpt) in line and ("depth" in line or "blocks" in line)
    assert not (tmp_path / "out").exists()


def test_official_layout_size_is_dit_s2():
    assert sum(math.prod(s) for s in official_shapes(**S2).values()) == 32_963_360


def test_linear_dit_inherits_an_imported_official_dit(tmp_path, s2_state, capsys):
    """The LiT path from an official checkpoint: import, then every official tensor lands in the linear
    DiT-S/2 under the same name (qkv keeps its shape with 2 heads), and only LiT's conv on V is new."""
    from genvis.models import inherit_weights
    from genvis.models.linear_dit import LinearDiT, LinearDiTConfig

    ckpt = tmp_path / "DiT-S-2.pt"
    torch.save(s2_state, ckpt)
    assert import_dit(ckpt, tmp_path / "dit") == 0
    capsys.readouterr()
    section = LinearDiTConfig(size="S", patch_size=2, recipe="lit")
    lit = LinearDiT(**section.resolved(), patch_size=2, input_size=32, in_channels=4, num_classes=1000)
    report = inherit_weights(lit, tmp_path / "dit")
    assert report.unused == () and set(report.copied) == set(s2_state)
    assert set(report.new) == {f"blocks.{i}.attn.v_conv.{p}" for i in range(12) for p in ("weight", "bias")}
    got = lit.state_dict()
    assert all(torch.equal(got[key], value) for key, value in s2_state.items())
