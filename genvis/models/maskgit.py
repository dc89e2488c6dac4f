"""MaskGIT: Masked Generative Image Transformer (Chang et al., CVPR 2022), as TiTok's generator.

A bidirectional transformer over the ids of a discrete tokenizer (TiTok's 1D ids or a VQ grid,
flattened row-major) that predicts every masked id at once. Layout and numerics follow
bytedance/1d-tokenizer's `ImageBert` (modeling/maskgit.py), a Hugging Face `BertModel` plus a head,
so official generator weights (generator_titok_l32.bin, ...) load under the same key names
(`convert_maskgit_state_dict`):

- one vocabulary for everything the input holds: ids [0, V) are image tokens, V is the mask token,
  V + 1 + c is class c and V + 1 + num_classes the null class (guidance);
- the class token is prepended at position 0; BERT's embeddings: word + token type (row 0, the
  same for every position) + absolute learned position (num_tokens + 1 of them), then LayerNorm
  (eps 1e-12) and dropout;
- BERT layers, post-LayerNorm: x = LN(x + drop(W_o attn(x))), x = LN(x + drop(W_2 gelu(W_1 x)))
  with the exact (erf) GELU, full (unmasked) softmax attention with dropout on the probabilities;
- the head `lm_head` maps the image positions (the class position's output is dropped) to V logits.

The decoding loop (confidence-based iterative unmasking) is genvis.samplers.tokens.decode_maskgit;
the training task masks a fraction `mask_ratio(r)` of the ids and drops labels to the null class
(the label dropout is not inside forward, unlike ImageBert's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange

from genvis.errors import ConfigError, GenvisError
from genvis.models.layers import attention, gelu
from genvis.registry import MODELS

BERT_LN_EPS = 1e-12
BERT_INIT_STD = 0.02  # BertConfig.initializer_range, as ImageBert
BERT_TYPE_VOCAB = 2  # BertConfig.type_vocab_size: two rows are stored, only row 0 is used


#################################################################################
#                      BERT blocks (HF BertModel's layout)                      #
#################################################################################


class BertEmbeddings(nn.Module):
    """ids [B, L] -> LN(word + token_type[0] + position[:L]), then dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(BERT_TYPE_VOCAB, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=BERT_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        L = ids_BL.shape[1]
        # BERT's order of the sums: (word + token type) + position
        x_BLC = self.word_embeddings(ids_BL) + self.token_type_embeddings.weight[0]
        x_BLC = x_BLC + self.position_embeddings.weight[:L]
        return self.dropout(self.LayerNorm(x_BLC))


class BertSelfAttention(nn.Module):
    """Multi-head softmax attention over the whole sequence (no mask), dropout on the probabilities."""

    def __init__(self, hidden_size: int, num_heads: int, attn_dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.num_heads, self.attn_dropout = num_heads, attn_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(f(x_BLC), "b l (h d) -> b h l d", h=self.num_heads) for f in (self.query, self.key, self.value))
        if self.training and self.attn_dropout > 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout)
        else:
            out = attention(q, k, v)  # genvis's choice of kernel (two matmuls for bf16 on the CPU)
        return rearrange(out, "b h l d -> b l (h d)")


class BertResidualOutput(nn.Module):
    """BERT's post-LN residual: LN(x + dropout(dense(h))) (BertSelfOutput and BertOutput)."""

    def __init__(self, in_features: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=BERT_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x_BLC)


class BertAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, attn_dropout)
        self.output = BertResidualOutput(hidden_size, hidden_size, dropout)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x_BLC), x_BLC)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return gelu(self.dense(x_BLC))  # exact erf GELU (BERT's hidden_act "gelu")


class BertLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, dropout, attn_dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertResidualOutput(intermediate_size, hidden_size, dropout)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        x_BLC = self.attention(x_BLC)
        return self.output(self.intermediate(x_BLC), x_BLC)


class BertEncoder(nn.Module):
    def __init__(self, depth: int, **layer_kwargs):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(**layer_kwargs) for _ in range(depth)])

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x_BLC = layer(x_BLC)
        return x_BLC


class ImageBertBody(nn.Module):
    """What ImageBert keeps under `model.`: BertModel's embeddings and encoder (no pooler) plus lm_head."""

    def __init__(self, input_vocab: int, output_vocab: int, max_positions: int, hidden_size: int, depth: int,
                 num_heads: int, intermediate_size: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.embeddings = BertEmbeddings(input_vocab, hidden_size, max_positions, dropout)
        self.encoder = BertEncoder(depth, hidden_size=hidden_size, num_heads=num_heads,
                                   intermediate_size=intermediate_size, dropout=dropout, attn_dropout=attn_dropout)
        self.lm_head = nn.Linear(hidden_size, output_vocab)


#################################################################################
#                                 MaskGIT model                                 #
#################################################################################


class MaskGIT(ModelMixin, ConfigMixin):
    """Class-conditional masked token transformer (TiTok's ImageBert).

    Args:
        vocab_size: the tokenizer's codebook size V; id V is the mask token. Default 4096 (TiTok).
        num_tokens: ids per image N (TiTok-L-32: 32; a 16x16 VQ grid: 256). Default 32.
        token_shape: the ids' shape per image, (N,) for TiTok's 1D ids or (h, w) for a VQ grid (row-major);
            its product is num_tokens. Default (32,).
        num_classes: real classes; label num_classes is the null class. Default 1000.
        hidden_size / depth / num_heads / intermediate_size: BERT's sizes (TiTok's generators: 768, 24, 16, 3072).
        dropout: BERT's hidden_dropout_prob (embeddings and both residual branches). Default 0.1.
        attn_dropout: BERT's attention_probs_dropout_prob. Default 0.1.
    """

    family = "maskgit"  # sampled by genvis.samplers.tokens.decode_maskgit

    @register_to_config
    def __init__(self, vocab_size: int = 4096, num_tokens: int = 32, token_shape: Tuple[int, ...] = (32,),
                 num_classes: int = 1000, hidden_size: int = 768, depth: int = 24, num_heads: int = 16,
                 intermediate_size: int = 3072, dropout: float = 0.1, attn_dropout: float = 0.1):
        super().__init__()
        shape = tuple(int(s) for s in token_shape)
        if not shape or any(s < 1 for s in shape) or math.prod(shape) != num_tokens:
            raise ConfigError(f"MaskGIT token_shape {list(shape)}: expected positive sides whose product is "
                              f"num_tokens = {num_tokens}")
        self._token_shape = shape
        self.num_classes = num_classes
        # input vocabulary: V image ids, the mask id, num_classes classes and the null class
        self.model = ImageBertBody(vocab_size + num_classes + 2, vocab_size, num_tokens + 1, hidden_size, depth,
                                   num_heads, intermediate_size, dropout, attn_dropout)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """BERT's _init_weights (ImageBert's post_init): Linear and Embedding weights N(0, 0.02), biases 0,
        LayerNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=BERT_INIT_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ids [B, N] int64 in [0, V] (V = mask_id), labels [B] int64 in [0, num_classes] (num_classes = null).
        Returns logits [B, N, V] for every position (the class position's output is dropped)."""
        B, N = ids.shape
        if N != self.num_tokens:
            raise GenvisError(f"ids of shape {tuple(ids.shape)}: expected [B, {self.num_tokens}] (the model's tokens "
                              f"{list(self.token_shape)}, flattened)")
        class_ids = labels.long() + self.mask_id + 1  # [B]: class c -> V + 1 + c
        x_BLC = self.model.embeddings(torch.cat([class_ids[:, None], ids.long()], dim=1))  # [B, N + 1, C]
        x_BLC = self.model.encoder(x_BLC)
        return self.model.lm_head(x_BLC[:, 1:])  # [B, N, V]

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def token_shape(self) -> Tuple[int, ...]:
        return self._token_shape

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 x MACs), as DiT's and VAR's: the N + 1 tokens (class first) through
        each layer's query, key, value, output and two MLP linears and the attention over all N + 1, then lm_head
        on the N image tokens."""
        c = self.config
        tokens, width = c.num_tokens + 1, c.hidden_size
        layer = 2 * tokens * (4 * width * width + 2 * width * c.intermediate_size) + 2 * 2 * tokens * tokens * width
        return float(c.depth * layer + 2 * c.num_tokens * width * c.vocab_size)

    def no_weight_decay(self) -> list:
        """Parameters usually trained without weight decay (BERT convention): biases, LayerNorm weights, embeddings."""
        return [n for n, p in self.named_parameters() if p.ndim <= 1 or "embeddings" in n]


@dataclass
class MaskGITConfig:
    """The run config's `model:` section for `arch: maskgit`. Vocabulary, token count and shape come from the
    tokenizer the run trains on (TiTok-L-32's generator: depth 24, width 768, 16 heads)."""

    arch: str = "maskgit"
    depth: int = 24
    hidden_size: int = 768
    num_heads: int = 16
    intermediate_size: Optional[int] = None  # null = 4 * hidden_size
    dropout: float = 0.1
    attn_dropout: float = 0.1
    class_dropout: float = 0.1  # label dropout in training (ImageBert's cond_drop_prob)
    init_from: Optional[str] = None  # a trained MaskGIT (run, checkpoint or model folder) whose tensors start the run

    def validate(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"key 'model.depth': must be >= 1, got {self.depth}")
        if self.hidden_size < 1:
            raise ConfigError(f"key 'model.hidden_size': must be >= 1, got {self.hidden_size}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ConfigError(f"key 'model.num_heads': {self.num_heads} does not divide model.hidden_size = {self.hidden_size}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(f"key 'model.intermediate_size': must be >= 1 (or null = 4 x hidden_size), got "
                              f"{self.intermediate_size}")
        for key in ("dropout", "attn_dropout", "class_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"key 'model.{key}': {value}: expected a value in [0, 1)")

    def resolved(self) -> dict:
        return dict(hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    intermediate_size=self.intermediate_size or 4 * self.hidden_size, dropout=self.dropout,
                    attn_dropout=self.attn_dropout)


@MODELS.register("maskgit", schema=MaskGITConfig, cls=MaskGIT, family=MaskGIT.family, task="tokens")
def maskgit_from_config(section: MaskGITConfig, *, vocab_size: int, token_shape: Sequence[int], num_classes: int) -> MaskGIT:
    """The MaskGIT a run config describes, over a tokenizer with `vocab_size` codes and ids of `token_shape`."""
    shape = tuple(int(s) for s in token_shape)
    return MaskGIT(vocab_size=vocab_size, num_tokens=math.prod(shape), token_shape=shape, num_classes=num_classes,
                   **section.resolved())


#################################################################################
#                   Foreign checkpoints (official ImageBert)                    #
#################################################################################

# BertModel's buffers, saved by some transformers versions; rebuilt (or never needed) here
OFFICIAL_BUFFERS = ("model.embeddings.position_ids", "model.embeddings.token_type_ids")


def convert_maskgit_state_dict(state: Dict[str, torch.Tensor], where: str, *, num_heads: int = 16,
                               token_shape: Optional[Sequence[int]] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(constructor arguments, state dict for MaskGIT) from an official ImageBert state dict (generator_titok_*.bin).

    The key names are genvis's; BertModel's position_ids / token_type_ids buffers are dropped. Sizes are read
    off the shapes; the head count is not in the tensors (TiTok's generators: 16), and the token shape defaults
    to TiTok's (num_tokens,). Anything missing or unknown is named (first few) in one line.
    """
    needed = ("model.embeddings.word_embeddings.weight", "model.embeddings.position_embeddings.weight",
              "model.lm_head.weight", "model.encoder.layer.0.intermediate.dense.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise GenvisError(f"{where}: not an official ImageBert (MaskGIT) layout: missing key(s) {', '.join(missing)}")
    out = {k: v for k, v in state.items() if k not in OFFICIAL_BUFFERS}
    vocab_size, hidden = out["model.lm_head.weight"].shape
    rows = out["model.embeddings.word_embeddings.weight"].shape[0]
    num_tokens = out["model.embeddings.position_embeddings.weight"].shape[0] - 1
    depth = 1 + max(int(k.split(".")[3]) for k in out if k.startswith("model.encoder.layer."))
    if hidden % num_heads:
        raise GenvisError(f"{where}: width {hidden} is not divisible by {num_heads} heads")
    config = dict(vocab_size=int(vocab_size), num_tokens=int(num_tokens),
                  token_shape=tuple(int(s) for s in token_shape) if token_shape is not None else (int(num_tokens),),
                  num_classes=int(rows - vocab_size - 2), hidden_size=int(hidden), depth=depth, num_heads=num_heads,
                  intermediate_size=int(out["model.encoder.layer.0.intermediate.dense.weight"].shape[0]))
    if config["num_classes"] < 1:
        raise GenvisError(f"{where}: {rows} word embeddings for a vocabulary of {vocab_size}: expected vocabulary + "
                          "classes + 2 (the mask and null tokens)")
    with torch.device("meta"):  # the expected names and shapes, without allocating the weights
        expected = {k: v.shape for k, v in MaskGIT(**config).state_dict().items()}
    unknown = sorted(set(out) - set(expected))
    missing = sorted(set(expected) - set(out))
    if unknown or missing:
        parts = ([f"unknown key(s) {', '.join(unknown[:4])}"] if unknown else []) + \
                ([f"missing key(s) {', '.join(missing[:4])}"] if missing else [])
        raise GenvisError(f"{where}: not an official ImageBert (MaskGIT) layout: {'; '.join(parts)}")
    wrong = [k for k in expected if tuple(out[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise GenvisError(f"{where}: {k} has shape {tuple(out[k].shape)}, expected {tuple(expected[k])}")
    return config, out
