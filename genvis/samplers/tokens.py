"""Decoding loops of the token generators: VAR's next-scale prediction (MaskGIT joins it later).

VAR (Tian et al. 2024, FoundationVision/VAR `autoregressive_infer_cfg`): S forward passes for S
scales. Pass k feeds only scale k's tokens; each block's attention appends their keys/values to
a KV cache and attends to everything cached, which is what the block-causal mask of training
allows (a token sees its own and the earlier scales), so no token is recomputed. The ids of
scale k are drawn from the (guided, filtered) logits; their code vectors, upsampled and refined
by the tokenizer's phi, are added to f_hat, and f_hat area-downsampled to scale k + 1 is that
scale's input (`MultiScaleQuantizer.accumulate`).

Randomness: sample i's token draws (and Gumbel noise) come from generators[i] alone, in a fixed
order, so an image does not depend on the batch size or on which process draws it.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence

import torch

from genvis.errors import GenvisError
from genvis.registry import FAMILIES
from genvis.samplers.options import VARSampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of logits [..., V]: removed entries become -inf (VAR's
    sample_with_top_k_top_p_: the ids whose ascending cumulative probability is <= 1 - top_p go, the most
    likely id always stays). top_k = 0 / top_p = 0 turn a filter off."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -torch.inf)
    return logits


def draw_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """ids [B, l]: token j of sample i drawn from softmax(logits[i, j]) with generators[i] (multinomial, on the
    generator's device)."""
    probs = logits.float().softmax(dim=-1)
    if all(g.device.type == "cpu" for g in generators):
        probs = probs.cpu()
    out = [torch.multinomial(probs[i].to(g.device), 1, generator=g)[:, 0].to(logits.device) for i, g in enumerate(generators)]
    return torch.stack(out)


def gumbel_softmax(logits: torch.Tensor, tau: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / tau) [B, l, V], sample i's noise from generators[i] (VAR's
    gumbel_softmax_with_rng, soft)."""
    noise = torch.stack([-torch.empty(logits.shape[1:], device=g.device).exponential_(generator=g).log().to(logits.device)
                         for g in generators])
    return ((logits + noise) / tau).softmax(dim=-1)


def guidance_scale(cfg: float, k: int, num_scales: int) -> float:
    """s_k = 1 + (cfg - 1) k / (S - 1): no guidance at the first scale, cfg at the last."""
    return 1.0 + (cfg - 1.0) * k / max(num_scales - 1, 1)


@torch.no_grad()
def decode_var(model, labels: torch.Tensor, *, quantizer, generators: Sequence[torch.Generator], cfg: float = 1.0,
               top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0, smooth: bool = False,
               kv_cache: bool = True, autocast: Callable = nullcontext, callback: Optional[Callable] = None) -> torch.Tensor:
    """Sample VAR for `labels` [B]. quantizer: the tokenizer's MultiScaleQuantizer (code vectors, phi, f_hat).

    Returns the ids of all scales concatenated [B, L] (int64), or, with `smooth`, the accumulated features
    f_hat [B, token_dim, p, p] (the Gumbel mixtures are not ids); the tokenizer's `decode` takes either.
    cfg, top_k, top_p, temperature, smooth, kv_cache: see genvis.samplers.options.VARSampling.
    """
    b, scales = len(labels), model.scales
    if len(generators) != b:
        raise GenvisError(f"{len(generators)} generators for {b} labels: give one per sample")
    num = len(scales)
    guided = cfg != 1.0
    y = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guided else labels
    cond_BD = model.class_emb(y)
    tokens = model.start_tokens(cond_BD)
    caches = model.new_caches() if kv_cache else None
    prefix: List[torch.Tensor] = []
    side = scales[-1]
    f_hat = torch.zeros(b, quantizer.dim, side, side, device=labels.device)
    ids_out = []
    for k, p in enumerate(scales):
        with autocast():
            if kv_cache:
                logits = model.run(tokens, cond_BD, caches=caches)
            else:  # the whole prefix again, under the block-causal mask; keep the last scale's logits
                prefix.append(tokens)
                x = torch.cat(prefix, dim=1)
                logits = model.run(x, cond_BD, mask=model.mask_LL[: x.shape[1], : x.shape[1]])[:, -p * p:]
        logits = logits.float()
        if guided:
            s = guidance_scale(cfg, k, num)
            logits = s * logits[:b] - (s - 1.0) * logits[b:]
        logits = filter_logits(logits / temperature, top_k, top_p)
        ids = draw_tokens(logits, generators)
        ids_out.append(ids)
        if smooth:
            ratio = k / max(num - 1, 1)
            mix = gumbel_softmax(logits * (1 + ratio), max(0.27 * (1 - ratio * 0.95), 0.005), generators)
            codes = (mix @ quantizer.vectors().float()).transpose(1, 2).reshape(b, quantizer.dim, p, p)
        else:
            codes = quantizer.embed(ids, k).float()
        f_hat, nxt = quantizer.accumulate(k, f_hat, codes)
        if k < num - 1:
            tokens = model.embed_scale(k + 1, nxt.flatten(2).transpose(1, 2))
            if guided:
                tokens = tokens.repeat(2, 1, 1)
        if callback is not None:
            callback({"scale": k, "ids": ids})
    return f_hat if smooth else torch.cat(ids_out, dim=1)


def check_var_tokenizer(model, tokenizer) -> None:
    """A VAR decodes with the multi-scale tokenizer it was trained on: same vocabulary, code width and scales."""
    if tokenizer is None or getattr(tokenizer, "token_layout", None) != "scales":
        name = "none" if tokenizer is None else type(tokenizer).__name__
        raise GenvisError(f"a VAR needs its multi-scale VQ tokenizer to decode; got {name} (pass the tokenizer it was "
                          "trained with, e.g. --tokenizer DIR)")
    c = model.config
    for what, mine, theirs in (("vocabulary", c.vocab_size, tokenizer.vocab_size),
                               ("scales", list(model.scales), list(tokenizer.scales)),
                               ("code dimension", c.token_dim, tokenizer.quantize.dim)):
        if mine != theirs:
            raise GenvisError(f"the VAR's {what} is {mine} but the tokenizer's is {theirs}; give the tokenizer the "
                              "model was trained with")


@FAMILIES.register("var", schema=VARSampling)
class VARFamilySampler:
    """Samples a VAR with `options` and decodes through `tokenizer`'s quantizer."""

    def __init__(self, model, options: VARSampling, tokenizer=None):
        check_var_tokenizer(model, tokenizer)
        self.model, self.options, self.quantizer = model, options, tokenizer.quantize
        self.steps_per_batch = len(model.scales)

    def __call__(self, labels: torch.Tensor, generators, *, autocast: Callable, callback: Optional[Callable] = None) -> torch.Tensor:
        o = self.options
        return decode_var(self.model, labels, quantizer=self.quantizer, generators=generators, cfg=o.cfg, top_k=o.top_k,
                          top_p=o.top_p, temperature=o.temperature, smooth=o.smooth, kv_cache=o.kv_cache,
                          autocast=autocast, callback=callback)
