"""BERT encoder and pretraining heads in plain torch.

Parameter names mirror transformers' ``BertForPreTraining`` so a state dict loads there unchanged (see
``bert/export.py``). Differences are only in speed (measured with ``benchmarks/train_speed.py`` on a 2-core
AVX2 CPU): the MLM head can run on the masked positions alone instead of every position; no attention mask
is built when nothing is padded; q, k, v come from one (3C, C) product; with dropout, attention is explicit
(CPU SDPA falls back to its slow math path there) and dropout masks come from one uniform draw per element,
half the cost of ``F.dropout``'s bernoulli, whose single-threaded RNG was the largest non-matmul cost of a
training step. Without dropout (eval) attention goes through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# name -> (num_hidden_layers, hidden_size): the compact models of Turc et al. 2019 ("Well-Read Students
# Learn Better") plus BERT-base; heads = H / 64 and FFN = 4H as in the paper.
PRESETS: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
}


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides: Any) -> BertConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        layers, hidden = PRESETS[name]
        shape = dict(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
        )
        return cls(vocab_size=vocab_size, **{**shape, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        # strict on purpose: a misspelled key in a checkpoint or YAML should fail, not fall back to a default
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown BertConfig keys: {sorted(unknown)}")
        return cls(**d)

    def to_transformers_dict(self) -> dict[str, Any]:
        """The config.json that ``transformers.BertConfig`` reads; hidden_act 'gelu' is the exact erf GELU."""
        return {
            **self.to_dict(),
            "hidden_act": "gelu",
            "model_type": "bert",
            "architectures": ["BertForPreTraining"],
            "tie_word_embeddings": True,
        }


def check_vocab(config: BertConfig, vocab_size: int) -> None:
    """Fail early when a model is built from one tokenizer and its weights come from another."""
    if config.vocab_size != vocab_size:
        raise ValueError(
            f"model config has vocab {config.vocab_size}, tokenizer has {vocab_size}: the tokenizer does "
            "not belong to this model/checkpoint (use the tokenizer saved with it)"
        )


def _init_weights(module: nn.Module, std: float) -> None:
    """BERT's init (and transformers'): N(0, std) weights, zero biases, unit LayerNorm, zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """1.0 where dropout keeps an element (probability 1 - p), else 0.0; the 1/(1-p) is the caller's."""
    return torch.rand_like(x).ge_(p)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    return (x * _keep_mask(x, p)).mul_(1.0 / (1.0 - p))


def _dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x), as one addcmul in training."""
    if not training or p == 0.0:
        return x + residual
    return torch.addcmul(residual, x, _keep_mask(x, p), value=1.0 / (1.0 - p))


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.size(1)
        position_ids = torch.arange(T, device=input_ids.device)  # (T,), broadcast over the batch
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        x = x + self.position_embeddings(position_ids)
        return _dropout(self.LayerNorm(x), self.dropout.p, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C); attn_mask None (nothing padded) or additive (B, 1, 1, T): 0 = attend, -big = pad."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        p = self.dropout_p if self.training else 0.0
        # one (3C, C) product for q, k, v; BERT's 1/sqrt(hs) is folded into the query weight and dropout's
        # 1/(1-p) into the value weight: (probs * keep / (1-p)) @ v == (probs * keep) @ (v / (1-p))
        q_scale, v_scale = hs**-0.5, 1.0 / (1.0 - p)
        weight = torch.cat([self.query.weight * q_scale, self.key.weight, self.value.weight * v_scale])
        bias = torch.cat([self.query.bias * q_scale, self.key.bias, self.value.bias * v_scale])
        qkv = F.linear(x, weight, bias).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        if p == 0.0:
            # SDPA: its flash kernel on CPU when there is no mask
            q, k, v = qkv.unbind(0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
            return y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        # with dropout CPU SDPA takes its math path (scaling, transposed copies, bernoulli): explicit here,
        # all heads in one batch of B * nh
        q, k, v = qkv.reshape(3, B * nh, T, hs).unbind(0)
        if attn_mask is None:
            scores = torch.bmm(q, k.transpose(1, 2))  # (B * nh, T, T)
        else:
            mask = attn_mask.expand(B, nh, 1, T).reshape(B * nh, 1, T)
            scores = torch.baddbmm(mask, q, k.transpose(1, 2))  # mask added in the product
        probs = torch.softmax(scores, dim=-1)
        y = torch.bmm(probs * _keep_mask(probs, p), v)  # (B * nh, T, hs)
        return y.view(B, nh, T, hs).transpose(1, 2).reshape(B, T, C)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # post-LN, as in the original BERT: LayerNorm(dropout(dense(y)) + residual)
        return self.LayerNorm(_dropout_add(self.dense(y), residual, self.dropout.p, self.training))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU: what "gelu" means in BERT and transformers


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        # (B, T, 4C) -> (B, T, C): LayerNorm(dropout(dense(h)) + residual)
        return self.LayerNorm(_dropout_add(self.dense(h), residual, self.dropout.p, self.training))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.layer:
            x = block(x, attn_mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, T, C) -> (B, C) from [CLS]


class BertModel(nn.Module):
    """The encoder. Build it with ``add_pooling_layer=False`` for token tasks (NER): an unused pooler makes
    DDP raise "parameters that were not used"."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def reinit_top_layers(self, n: int) -> None:
        """Random init again for the top `n` layers and the pooler: the layers nearest the pretraining heads are
        the most specialised to MLM/NSP, and a small fine-tuning set can do better starting them afresh
        (Zhang et al. 2021, "Revisiting few-sample BERT fine-tuning")."""
        layers = self.encoder.layer
        if not 0 <= n <= len(layers):
            raise ValueError(f"reinit_layers={n}: the encoder has {len(layers)} layers")
        modules = list(layers[len(layers) - n:]) + ([self.pooler] if n and self.pooler is not None else [])
        for module in modules:
            module.apply(lambda m: _init_weights(m, self.config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T); attention_mask (B, T) 1 = token, 0 = pad. Returns ((B, T, C), (B, C) or None)."""
        B, T = input_ids.shape
        cfg = self.config
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} > max_position_embeddings {cfg.max_position_embeddings}")
        # one host sync per step; an out-of-range id is otherwise an opaque IndexError (or a CUDA assert)
        if not torch.compiler.is_compiling() and input_ids.numel():
            lo, hi = (int(t) for t in torch.aminmax(input_ids))
            if hi >= cfg.vocab_size or lo < 0:
                raise ValueError(
                    f"input ids span [{lo}, {hi}] but the vocab has {cfg.vocab_size} entries: "
                    "the tokenizer does not belong to this model"
                )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # additive mask over keys (pad queries still get an output); none at all when nothing is padded, as in
        # full-length pretraining batches (the check is a host sync: free on CPU, a graph break when compiled)
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            dtype = self.embeddings.word_embeddings.weight.dtype
            pad = attention_mask.view(B, 1, 1, T) == 0
            attn_mask = torch.zeros(pad.shape, dtype=dtype, device=pad.device).masked_fill(
                pad, torch.finfo(dtype).min
            )
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        x = self.encoder(x, attn_mask)
        pooled = self.pooler(x) if self.pooler is not None else None
        return x, pooled


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # tied like transformers: decoder.weight is the input embedding, decoder.bias is self.bias, so the
        # state dict carries both names and loads into transformers.BertForPreTraining with strict=True
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))  # (..., C) -> (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class PreTrainingOutput(NamedTuple):
    mlm_logits: torch.Tensor  # (N, V) at masked positions, or (B, T, V) when masked_positions is None
    nsp_logits: torch.Tensor  # (B, 2); class 0 = B follows A, 1 = random B (Google's and HF's convention)


class BertForPreTraining(nn.Module):
    """Encoder + MLM and NSP heads. The losses live in the LightningModule, for example:

    masked_positions = labels != -100  # (B, T) bool
    out = model(input_ids, token_type_ids, attention_mask, masked_positions)
    mlm_targets = labels[masked_positions]  # (N,), same order as out.mlm_logits (N, V)
    mlm_loss = F.cross_entropy(out.mlm_logits, mlm_targets)
    nsp_loss = F.cross_entropy(out.nsp_logits, next_sentence_label)
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=True)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        # not self.apply: the tied decoder would re-draw the embedding (and its zero padding row)
        for m in [*self.cls.predictions.transform.modules(), self.cls.seq_relationship]:
            _init_weights(m, config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
    ) -> PreTrainingOutput:
        x, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, C), (B, C)
        if masked_positions is not None:
            # only ~15% of positions carry an MLM target: skip the (B, T, V) logits (Google, NVIDIA, Cramming)
            x = x[masked_positions.bool()]  # (B, T, C) -> (N, C)
        mlm_logits = self.cls.predictions(x)  # (N, V) or (B, T, V)
        return PreTrainingOutput(mlm_logits, self.cls.seq_relationship(pooled))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Parameters counted once each (tied decoder = embedding), like transformers' num_parameters()."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def load_state_dict_checked(
    model: BertModel | BertForPreTraining, state_dict: Mapping[str, torch.Tensor], strict: bool = True
):
    """load_state_dict with a clear error when the checkpoint's vocab differs from the model's.

    A pretraining state dict ('bert.'-prefixed, with 'cls.' heads) also loads into a bare ``BertModel``:
    the heads are dropped, and the pooler too when the model has none (NER fine-tuning).
    """
    if isinstance(model, BertModel):
        if any(k.startswith("bert.") for k in state_dict):
            state_dict = {k[len("bert.") :]: v for k, v in state_dict.items() if k.startswith("bert.")}
        if model.pooler is None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("pooler.")}
        key = "embeddings.word_embeddings.weight"
    else:
        key = "bert.embeddings.word_embeddings.weight"
    if key not in state_dict:
        raise ValueError(f"not a BERT state dict: no {key!r} (keys start {list(state_dict)[:3]})")
    ckpt_vocab, ckpt_hidden = state_dict[key].shape
    cfg = model.config
    if ckpt_vocab != cfg.vocab_size:
        raise ValueError(
            f"checkpoint has vocab {ckpt_vocab}, tokenizer has {cfg.vocab_size}: the tokenizer does not "
            "belong to this checkpoint (load the tokenizer saved next to it)"
        )
    if ckpt_hidden != cfg.hidden_size:
        raise ValueError(f"checkpoint has hidden size {ckpt_hidden}, model config has {cfg.hidden_size}")
    return model.load_state_dict(state_dict, strict=strict)
