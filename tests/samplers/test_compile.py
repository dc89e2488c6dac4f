"""`generate(..., compile=True)` / `genvis sample --compile`: every family's compiled sampling (torch.compile,
inductor) gives the eager images, in float32, at tiny sizes: a latent DiT decoded by a KL tokenizer (the decoder
compiled too, with inductor's freezing on the CPU), VAR with its KV cache (token counts growing by scale) and
MaskGIT. The linear-attention DiT takes the diffusion family's path, as DiT does;
benchmarks/speed.py compares it. The first compile of a graph takes seconds on this CPU; inductor's on-disk cache
makes repeats fast."""
import math

import torch

from genvis.generate import generate
from genvis.samplers.tokens import maskgit_pick, var_pick

LABELS = torch.tensor([0, 1, 2, 3])


def o1_weights(model, seed=0):
    """O(1) random weights (the official inits zero the adaLN and output layers, which would make every family
    output a constant and the comparison empty)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[1] if p.ndim >= 2 else 1
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in * math.prod(p.shape[2:])))
            elif "norm" not in name.lower():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def eager_and_compiled(model, tokenizer, **options):
    eager = generate(model, tokenizer, LABELS, seed=3, precision="fp32", **options)
    compiled = generate(model, tokenizer, LABELS, seed=3, precision="fp32", compile=True, **options)
    return eager, compiled


def test_latent_dit():
    """...with the decoder compiled frozen on the CPU (`compile_decoder`): inductor's freezing runs the convolutions
    on prepacked oneDNN weights (mkldnn::_convolution_pointwise, an op only freezing emits; unfrozen, inductor calls
    aten::convolution). One test, because a frozen compile is not in inductor's cache: each one takes seconds."""
    from torch.profiler import profile

    from genvis.models.dit import DiT
    from genvis.tokenizers.kl import KLConfig, KLTokenizer

    model = o1_weights(DiT(input_size=4, patch_size=1, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                           learn_sigma=False, prediction_type="velocity", schedule="flow"))
    torch.manual_seed(0)
    tokenizer = KLTokenizer.from_section(KLConfig(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
                                                  norm_num_groups=8), (1, 8, 8)).eval()
    options = dict(sampler="heun", steps=3, cfg=2.0)
    eager, compiled = eager_and_compiled(model, tokenizer, **options)
    assert eager.shape == (4, 1, 8, 8) and eager.std() > 0.01
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert model._compiled_call_impl is not None  # compiled in place: later calls reuse it
    with profile(record_shapes=True) as prof:  # a second compiled run reuses the compiled code
        again = generate(model, tokenizer, LABELS, seed=3, precision="fp32", compile=True, **options)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)
    assert "mkldnn::_convolution_pointwise" in {event.name for event in prof.events()}
    # Unfrozen, a convolution enters aten::convolution (aten then picks oneDNN or its own 1x1 kernel by thread count).
    unfrozen = [event.input_shapes[1] for event in prof.events() if event.name == "aten::convolution"]
    assert unfrozen and all(w == list(model.x_embedder.proj.weight.shape) for w in unfrozen)  # DiT's patch embedder only


def test_var_with_its_kv_cache():
    from genvis.models.var import VAR
    from genvis.tokenizers.multiscale_vq import MultiScaleVQTokenizer

    torch.manual_seed(0)
    tokenizer = MultiScaleVQTokenizer(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8,
                                      codebook_size=12, scales=(1, 2, 3, 4)).eval()
    model = o1_weights(VAR(vocab_size=12, token_dim=8, scales=(1, 2, 3, 4), num_classes=10, depth=2, embed_dim=32,
                           num_heads=2))
    for options in (dict(cfg=1.5, top_k=0, top_p=0.0), dict(cfg=2.0, top_k=6, top_p=0.9)):
        eager, compiled = eager_and_compiled(model, tokenizer, **options)
        assert eager.shape == (4, 1, 8, 8)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert all(block._compiled_call_impl is not None for block in model.blocks) and model.head._compiled_call_impl is not None
    assert_draw_is_compiled("var", model, tokenizer, var_pick)


def assert_draw_is_compiled(family, model, tokenizer, pick):
    """The family sampler's compile() also compiles its per-step draw (guidance, filtering, noise, argmax)."""
    from genvis.registry import FAMILIES

    sampler = FAMILIES.get(family)(model, FAMILIES.schema(family)(), tokenizer)
    assert sampler.pick is pick
    sampler.compile()
    assert getattr(sampler.pick, "_torchdynamo_orig_callable", None) is pick


def test_maskgit():
    from genvis.models.maskgit import MaskGIT
    from genvis.tokenizers.vq import VQTokenizer

    torch.manual_seed(1)
    tokenizer = VQTokenizer(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8,
                            codebook_size=16, codebook_dim=4).eval()
    model = o1_weights(MaskGIT(vocab_size=16, num_tokens=16, token_shape=(4, 4), num_classes=10, hidden_size=32, depth=2,
                               num_heads=4, intermediate_size=64))
    eager, compiled = eager_and_compiled(model, tokenizer, steps=4, cfg=2.0)
    assert eager.shape == (4, 1, 8, 8)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert model._compiled_call_impl is not None
    assert_draw_is_compiled("maskgit", model, tokenizer, maskgit_pick)
