"""Decoding loops of the token generators: VAR's next-scale prediction and MaskGIT's iterative unmasking.

VAR (Tian et al. 2024, FoundationVision/VAR `autoregressive_infer_cfg`): S forward passes for S
scales. Pass k feeds only scale k's tokens; each block's attention appends their keys/values to
a KV cache and attends to everything cached, which is what the block-causal mask of training
allows (a token sees its own and the earlier scales), so no token is recomputed. The ids of
scale k are drawn from the (guided, filtered) logits by Gumbel-max (-log(-log U) noise, U
uniform, one per logit); their code vectors, upsampled and refined
by the tokenizer's phi, are added to f_hat, and f_hat area-downsampled to scale k + 1 is that
scale's input (`MultiScaleQuantizer.accumulate`).

MaskGIT (Chang et al. 2022; TiTok's ImageBert.generate, bytedance/1d-tokenizer): all N ids start
masked. Step k of K (progress r = (k + 1) / K) runs the whole sequence once (twice with guidance),
samples an id for every masked position by Gumbel-max (TiTok's -log(-log U) noise) with the annealed
temperature T (1 - r), keeps the ids already revealed, scores each new id by its logit plus a second
Gumbel draw (revealed ids score +inf) and re-masks the lowest-scored ones so that floor(N mask_ratio(r))
stay masked (at least one, and at least one fewer than before); the last step reveals every id.

Randomness: sample i's token draws (and Gumbel noise) come from generators[i] alone, in a fixed
order, so an image does not depend on the batch size or on which process draws it.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Union

import torch

from genvis.errors import GenvisError
from genvis.registry import FAMILIES
from genvis.samplers.options import MASKGIT_CFG_SCHEDULES, MASK_SCHEDULES, MaskGITSampling, VARSampling


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of logits [..., V]: removed entries become -inf (VAR's
    sample_with_top_k_top_p_: the ids whose ascending cumulative probability is <= 1 - top_p go, the most
    likely id always stays). top_k = 0 / top_p = 0 turn a filter off. The input is never modified (with both off it
    is returned as it is).

    The removed ids are a prefix of the ascending order, so top-p keeps every logit >= the first kept sorted
    value: no scatter back to vocabulary order (inductor's CPU scatter runs serially). Where logits tie at that
    value all of them stay; VAR's scatter removes an arbitrary subset of the tied ones. After top-k, top-p needs
    only the k values topk returns sorted, not a sort of the vocabulary (`_top_p_cutoff`)."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        top = logits.topk(top_k, dim=-1, sorted=top_p > 0).values  # sorted: descending
        kth = top[..., -1:] if top_p > 0 else top.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, -torch.inf)
        if top_p > 0:
            # ids tied with the k-th beyond the k also stayed: they come first in the ascending order
            extra = (logits >= kth).sum(dim=-1, keepdim=True) - top_k
            return logits.masked_fill(logits < _top_p_cutoff(top.flip(-1), top_p, extra), -torch.inf)
    elif top_p > 0:
        ascending = logits.sort(dim=-1).values
        return logits.masked_fill(logits < _top_p_cutoff(ascending, top_p), -torch.inf)
    return logits


def _top_p_cutoff(ascending: torch.Tensor, top_p: float, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[..., 1]: the smallest logit top-p keeps, from the kept logits in ascending order [..., n] (-inf allowed).
    `extra` [..., 1]: how many more ids, each equal to ascending[..., :1], precede them (they count in the softmax
    and the cumulative sum; the cutoff is then at least that value, so they stay or go with the comparison)."""
    if extra is None:
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    else:  # softmax over the n values and the extra copies of the smallest, copies first
        weights = (ascending - ascending[..., -1:]).exp()
        before = extra * weights[..., :1]
        cumulative = (weights.cumsum(dim=-1) + before) / (weights.sum(dim=-1, keepdim=True) + before)
    removed = (cumulative <= 1 - top_p).sum(dim=-1, keepdim=True)
    return ascending.gather(-1, removed.clamp_max(ascending.shape[-1] - 1))


def per_sample_draws(shape: Sequence[int], generators: Sequence[torch.Generator], device=None,
                     kind: str = "uniform") -> torch.Tensor:
    """[B, *shape] float32 on `device`, row i drawn from generators[i] (all on one device): U ~ Uniform[0, 1)
    ("uniform") or E ~ Exp(1) ("exponential")."""
    out = torch.empty((len(generators), *shape), device=generators[0].device)
    for row, g in zip(out, generators):
        row.uniform_(generator=g) if kind == "uniform" else row.exponential_(generator=g)
    return out.to(device)


def gumbel_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device=None) -> torch.Tensor:
    """Standard Gumbel noise [B, *shape] (float32 on `device`), sample i's from generators[i]: -log E with
    E ~ Exp(1), which is -log(-log U) with U ~ Uniform(0, 1) (VAR's gumbel_softmax_with_rng)."""
    tiny = torch.finfo(torch.float32).tiny  # E = 0 would give +inf
    return -per_sample_draws(shape, generators, device, kind="exponential").clamp_min_(tiny).log_()


def gumbel_of_uniform(u: torch.Tensor) -> torch.Tensor:
    """-log(-log U), each log's argument clamped at 1e-20: TiTok's Gumbel noise (ImageBert.generate). One uniform
    draw is about 5x cheaper than an exponential one on the CPU, which counts for MaskGIT's [N, V] draw per step."""
    return -(-u.clamp_min(1e-20).log()).clamp_min(1e-20).log()


def gumbel_softmax(logits: torch.Tensor, tau: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """softmax((logits + Gumbel noise) / tau) [B, l, V], sample i's noise from generators[i] (VAR's
    gumbel_softmax_with_rng, soft)."""
    noise = gumbel_noise(logits.shape[1:], generators, logits.device)
    return ((logits + noise) / tau).softmax(dim=-1)


def var_pick(cond: torch.Tensor, uncond: Optional[torch.Tensor], u: torch.Tensor, scale: torch.Tensor,
             scale_minus_one: torch.Tensor, temperature: torch.Tensor, top_k: int = 0, top_p: float = 0.0):
    """One VAR scale's draw from the network's logits cond, uncond [B, l, V] (uncond None: unguided): logits =
    (scale cond - (scale - 1) uncond) / temperature in float32, filtered by `filter_logits(logits, top_k, top_p)`,
    ids = argmax(filtered + gumbel_of_uniform(u)) for u [B, l, V] uniform: Gumbel-max, the same distribution as
    torch.multinomial(softmax(filtered)) (VAR's draw), from one uniform number per logit where multinomial draws an
    exponential one (about 5x the cost on the CPU). Returns ids [B, l] and the filtered logits. The scalars are
    0-dim tensors, so one compiled graph serves every scale."""
    logits = cond.float()
    if uncond is not None:
        logits = scale * logits - scale_minus_one * uncond.float()
    logits = filter_logits(logits / temperature, top_k, top_p)
    return (logits + gumbel_of_uniform(u)).argmax(dim=-1), logits


def guidance_scale(cfg: float, k: int, num_scales: int) -> float:
    """s_k = 1 + (cfg - 1) k / (S - 1): no guidance at the first scale, cfg at the last."""
    return 1.0 + (cfg - 1.0) * k / max(num_scales - 1, 1)


@torch.no_grad()
def decode_var(model, labels: torch.Tensor, *, quantizer, generators: Sequence[torch.Generator], cfg: float = 1.0,
               top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0, smooth: bool = False,
               kv_cache: bool = True, autocast: Callable = nullcontext, callback: Optional[Callable] = None,
               pick: Optional[Callable] = None) -> torch.Tensor:
    """Sample VAR for `labels` [B]. quantizer: the tokenizer's MultiScaleQuantizer (code vectors, phi, f_hat).

    Returns the ids of all scales concatenated [B, L] (int64), or, with `smooth`, the accumulated features
    f_hat [B, token_dim, p, p] (the Gumbel mixtures are not ids); the tokenizer's `decode` takes either.
    cfg, top_k, top_p, temperature, smooth, kv_cache: see genvis.samplers.options.VARSampling. `pick` replaces
    `var_pick` (the sampler passes its compiled form).
    """
    pick = pick or var_pick
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
        cond, uncond = (logits[:b], logits[b:]) if guided else (logits, None)
        s = guidance_scale(cfg, k, num)
        u = per_sample_draws(cond.shape[1:], generators, labels.device)
        ids, logits = pick(cond, uncond, u, *(torch.tensor(v, device=labels.device) for v in (s, s - 1.0, temperature)),
                           top_k=top_k, top_p=top_p)
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


def mask_ratio(r: Union[float, torch.Tensor], schedule: str = "arccos") -> Union[float, torch.Tensor]:
    """The fraction of the tokens still masked at progress r in [0, 1] (0: all masked, 1: none).

    arccos: acos(r) / (pi / 2) (TiTok's MaskGIT, training and decoding); cosine: cos(r pi / 2) (MaskGIT's
    paper); linear: 1 - r. A float gives a float (float64, as the official numpy), a tensor a tensor.
    """
    if schedule not in MASK_SCHEDULES:
        raise GenvisError(f"mask schedule {schedule!r}: expected one of: {', '.join(MASK_SCHEDULES)}")
    if isinstance(r, torch.Tensor):
        if schedule == "arccos":
            return torch.acos(r) / (math.pi / 2)
        if schedule == "cosine":
            return torch.cos(r * (math.pi / 2))
        return 1.0 - r
    r = float(r)
    if schedule == "arccos":
        return math.acos(r) / (math.pi / 2)
    if schedule == "cosine":
        return math.cos(r * (math.pi / 2))
    return 1.0 - r


def maskgit_guidance_scale(cfg: float, k: int, steps: int, schedule: str = "linear") -> float:
    """s_k of MaskGIT's step k: linear 1 + (cfg - 1) k / steps (1 at the first step, TiTok's "linear"
    guidance_decay), constant cfg."""
    if schedule not in MASKGIT_CFG_SCHEDULES:
        raise GenvisError(f"guidance schedule {schedule!r}: expected one of: {', '.join(MASKGIT_CFG_SCHEDULES)}")
    return 1.0 + (cfg - 1.0) * k / steps if schedule == "linear" else float(cfg)


def maskgit_masked_after(num_tokens: int, masked: torch.Tensor, r: float, schedule: str = "arccos") -> torch.Tensor:
    """[B] long: how many ids stay masked after the step that reaches progress r < 1, for samples with `masked`
    [B] ids masked before it: floor(N mask_ratio(r)), at most masked - 1 (every step reveals one) and at least 1."""
    target = math.floor(num_tokens * mask_ratio(r, schedule))
    return (masked.long() - 1).clamp(max=target).clamp(min=1)


def maskgit_pick(cond: torch.Tensor, uncond: Optional[torch.Tensor], u: Optional[torch.Tensor], scale: torch.Tensor,
                 divisor: torch.Tensor, temperature: torch.Tensor):
    """One MaskGIT step's draw from the network's outputs cond, uncond [B, N, V] (uncond None: unguided):
    logits = (uncond + scale (cond - uncond)) / divisor in float32, ids = argmax(logits + temperature *
    gumbel_of_uniform(u)) (u [B, N, V]; None: no noise). Returns ids [B, N] and their logits [B, N]. The scalars
    are 0-dim tensors, so one compiled graph serves every step."""
    logits = cond.float()
    if uncond is not None:
        uncond = uncond.float()
        logits = uncond + scale * (logits - uncond)
    logits = logits / divisor
    noisy = logits if u is None else logits + temperature * gumbel_of_uniform(u)
    sampled = noisy.argmax(dim=-1)
    return sampled, logits.gather(-1, sampled[..., None])[..., 0]


@torch.no_grad()
def decode_maskgit(model, labels: torch.Tensor, *, generators: Sequence[torch.Generator], steps: int = 8,
                   schedule: str = "arccos", temperature: float = 1.0, cfg: float = 1.0, cfg_schedule: str = "linear",
                   anneal_softmax: bool = False, autocast: Callable = nullcontext,
                   callback: Optional[Callable] = None, pick: Optional[Callable] = None) -> torch.Tensor:
    """Sample a MaskGIT for `labels` [B]: ids [B, N] (int64, row-major for a grid), every id in [0, V).

    steps, schedule (MaskGITSampling.mask_schedule), temperature, cfg, cfg_schedule, anneal_softmax: see
    genvis.samplers.options.MaskGITSampling. `callback({"step": k, "ids": ids})` after each step, ids [B, N] with
    model.mask_id where still masked. Re-masking keeps exactly the computed number masked (ties in the confidence
    go by position), where TiTok's `confidence <= cut_off` would re-mask every tied id. `pick` replaces
    `maskgit_pick` (the sampler passes its compiled form).
    """
    pick = pick or maskgit_pick
    b, n, mask_id = len(labels), model.num_tokens, model.mask_id
    if len(generators) != b:
        raise GenvisError(f"{len(generators)} generators for {b} labels: give one per sample")
    if steps < 1:
        raise GenvisError(f"steps {steps}: expected >= 1")
    if schedule not in MASK_SCHEDULES:
        raise GenvisError(f"mask schedule {schedule!r}: expected one of: {', '.join(MASK_SCHEDULES)}")
    device = labels.device
    ids = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    null = torch.full_like(labels, model.null_class)
    for k in range(steps):
        r = (k + 1) / steps
        masked = ids == mask_id  # [B, N]
        s = maskgit_guidance_scale(cfg, k, steps, cfg_schedule)
        t = temperature * (1.0 - r)
        with autocast():
            if s == 1.0:  # no unconditional pass
                cond, uncond = model(ids, labels), None  # [B, N, V]
            else:
                cond, uncond = model(ids.repeat(2, 1), torch.cat([labels, null])).chunk(2)
        u = per_sample_draws(cond.shape[1:], generators, device) if t > 0 else None
        divisor = 0.5 + 0.8 * (1.0 - r) if anneal_softmax else 1.0
        sampled, chosen = pick(cond, uncond, u, *(torch.tensor(v, device=device) for v in (s, divisor, t)))
        sampled = torch.where(masked, sampled, ids)
        if k == steps - 1:
            ids = sampled
        else:
            confidence = chosen + t * gumbel_of_uniform(per_sample_draws((n,), generators, device)) if t > 0 else chosen
            confidence = torch.where(masked, confidence, torch.inf)
            keep_masked = maskgit_masked_after(n, masked.sum(dim=-1), r, schedule)  # [B]
            rank = confidence.argsort(dim=-1, stable=True).argsort(dim=-1)  # [B, N]: 0 = least confident
            ids = torch.where(rank < keep_masked[:, None], mask_id, sampled)
        if callback is not None:
            callback({"step": k, "ids": ids})
    return ids


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
        self.pick = var_pick

    def compile(self) -> None:
        """torch.compile each block and the head in place: decoding calls them once per scale, with the KV cache
        (shapes grow by scale; dynamo makes the token count dynamic after the second); and the scale's draw
        (guidance, top-k / top-p, Gumbel noise, argmax: the elementwise work fused around ATen's topk and sort)."""
        for block in self.model.blocks:
            block.compile()
        self.model.head_nm.compile()
        self.model.head.compile()
        self.pick = torch.compile(var_pick)

    def __call__(self, labels: torch.Tensor, generators, *, autocast: Callable, callback: Optional[Callable] = None) -> torch.Tensor:
        o = self.options
        return decode_var(self.model, labels, quantizer=self.quantizer, generators=generators, cfg=o.cfg, top_k=o.top_k,
                          top_p=o.top_p, temperature=o.temperature, smooth=o.smooth, kv_cache=o.kv_cache,
                          autocast=autocast, callback=callback, pick=self.pick)


def check_maskgit_tokenizer(model, tokenizer) -> None:
    """A MaskGIT decodes with a discrete tokenizer of ids in a sequence (TiTok) or a grid (VQ) of its vocabulary
    (and, for a sequence, of its length)."""
    layout = getattr(tokenizer, "token_layout", None)
    if tokenizer is None or getattr(tokenizer, "kind", None) != "discrete" or layout not in ("sequence", "grid"):
        name = "none" if tokenizer is None else type(tokenizer).__name__
        raise GenvisError(f"a MaskGIT needs a discrete tokenizer of id sequences or grids (TiTok, VQ) to decode; got "
                          f"{name} (pass the tokenizer it was trained with, e.g. --tokenizer DIR)")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise GenvisError(f"the MaskGIT's vocabulary is {model.config.vocab_size} but the tokenizer's is "
                          f"{tokenizer.vocab_size}; give the tokenizer the model was trained with")
    count = getattr(tokenizer, "num_tokens", None)
    if layout == "sequence" and count is not None and count != model.num_tokens:
        raise GenvisError(f"the MaskGIT generates {model.num_tokens} tokens per image but the tokenizer decodes "
                          f"{count}; give the tokenizer the model was trained with")


@FAMILIES.register("maskgit", schema=MaskGITSampling)
class MaskGITFamilySampler:
    """Samples a MaskGIT with `options`; returns ids [B, *model.token_shape] for the tokenizer's decode."""

    def __init__(self, model, options: MaskGITSampling, tokenizer=None):
        check_maskgit_tokenizer(model, tokenizer)
        self.model, self.options = model, options
        self.steps_per_batch = options.steps
        self.pick = maskgit_pick

    def compile(self) -> None:
        """torch.compile the network in place (every step is one full forward of the same shape) and the step's
        draw (guidance, Gumbel noise, argmax over the vocabulary: one fused pass over the logits)."""
        self.model.compile()
        self.pick = torch.compile(maskgit_pick)

    def __call__(self, labels: torch.Tensor, generators, *, autocast: Callable, callback: Optional[Callable] = None) -> torch.Tensor:
        o = self.options
        ids = decode_maskgit(self.model, labels, generators=generators, steps=o.steps, schedule=o.mask_schedule,
                             temperature=o.temperature, cfg=o.cfg, cfg_schedule=o.cfg_schedule,
                             anneal_softmax=o.anneal_softmax, autocast=autocast, callback=callback, pick=self.pick)
        return ids.view(len(labels), *self.model.token_shape)
