"""Task heads on the BERT encoder, with transformers' parameter names so that they export unchanged.

- `BertForSequenceClassification`: pooled [CLS] -> dropout -> linear (`classifier.weight/bias`), as
  transformers' class of that name; `num_labels == 1` is regression (MSE), otherwise cross-entropy.
  `pooling="mean"` reads the mean of the last layer over the attention mask instead (Sentence-BERT's
  pooling), with no pooler: [CLS] and the pooler are trained only by NSP, so an MLM-only checkpoint leaves
  them near random init while every other position learned from MLM.
- `BertCrfTagger`: token emissions -> linear-chain CRF (KLUE-NER). pytorch-crf needs a bool mask whose first
  timestep is on and valid tag ids everywhere (even under the mask), and returns a *summed log-likelihood*:
  the wrapper turns that into a mean negative log-likelihood. Its encoder has no pooler, so that plain DDP
  sees no unused parameters. Decoding can be constrained to tag paths IOB2 allows (`iob2_allowed`): entity F1
  is strict, so a path that opens a span with I-X or switches type inside one costs a whole entity, and a CRF
  trained for a few hundred steps has not learned to rule those paths out on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF

from bert.model import BertConfig, BertModel

POOLINGS = ("cls", "mean")


def masked_mean(sequence: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> (B, C): the mean over the positions the mask keeps (all of them when it is None)."""
    if attention_mask is None:
        return sequence.mean(dim=1)
    weights = attention_mask.to(sequence.dtype).unsqueeze(-1)  # (B, T, 1)
    return (sequence * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class BertForSequenceClassification(nn.Module):
    """Sentence and sentence-pair tasks (NLI, STS, topic): one vector per input, from the pooler (`cls`) or the
    masked mean of the last layer (`mean`, no pooler)."""

    def __init__(
        self, config: BertConfig, num_labels: int, classifier_dropout: float | None = None, pooling: str = "cls"
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.config = config
        self.num_labels = num_labels
        self.pooling = pooling
        self.bert = BertModel(config, add_pooling_layer=pooling == "cls")
        self.dropout = nn.Dropout(config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @property
    def problem_type(self) -> str:
        """transformers' name for the loss this head trains with (config.json `problem_type`)."""
        return "regression" if self.num_labels == 1 else "single_label_classification"

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, num_labels) logits (a score for regression)."""
        sequence, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, C), (B, C) or None
        if self.pooling == "mean":
            pooled = masked_mean(sequence, attention_mask)
        return self.classifier(self.dropout(pooled))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """MSE (regression) or cross-entropy; `weight` (num_labels,) per class, as `F.cross_entropy`'s (its
        weighted mean divides by the summed weights of the batch's labels)."""
        if self.num_labels == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels, weight=None if weight is None else weight.to(logits.device))


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """scikit-learn's `class_weight="balanced"`: n_samples / (n_classes * count), so every class carries the
    same total weight in the training loss (what macro F1 rewards). A class absent from training gets 0 and
    is not counted in n_classes (scikit-learn refuses it)."""
    counts = counts.double()
    weights = counts.sum() / (int((counts > 0).sum()) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


FORBIDDEN = -1.0e4  # added to a forbidden move's score: no path through it can win against an allowed one


def iob2_allowed(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(start (K,), transitions (K, K) [from, to]) bool masks of what IOB2 allows: `I-X` only after `B-X` or
    `I-X`, never first; every other move is allowed. Labels that are neither `O`, `B-*` nor `I-*` are refused."""
    for label in labels:
        if label != "O" and label[:2] not in ("B-", "I-"):
            raise ValueError(f"not an IOB2 label: {label!r} (expected O, B-<type> or I-<type>)")
    k = len(labels)
    start = torch.ones(k, dtype=torch.bool)
    transitions = torch.ones(k, k, dtype=torch.bool)
    for j, to in enumerate(labels):
        if to.startswith("I-"):
            start[j] = False
            for i, frm in enumerate(labels):
                transitions[i, j] = frm in (f"B-{to[2:]}", to)
    return start, transitions


def tagger_allowed(labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`iob2_allowed` for `BertCrfTagger`'s layout: position 0 is [CLS], trained as `O` and dropped when tags go
    back to characters, so the path must start with `O` (else [CLS]=B-X would let the first real piece be I-X)."""
    start, transitions = iob2_allowed(labels)
    return start & torch.tensor([label == "O" for label in labels]), transitions


def viterbi(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor,
    transitions: torch.Tensor,
    end: torch.Tensor,
) -> list[list[int]]:
    """Best tag path per sentence of a linear-chain CRF: emissions (B, T, K), a left-aligned bool mask (B, T),
    start/end (K,), transitions (K, K) [from, to]. The same recursion as pytorch-crf's decode, batched over
    tags, so that masked (constrained) scores can be passed in."""
    score = start + emissions[:, 0]  # (B, K)
    backpointers = []
    for t in range(1, emissions.size(1)):
        candidates = score.unsqueeze(2) + transitions + emissions[:, t].unsqueeze(1)  # (B, K from, K to)
        best, index = candidates.max(dim=1)
        score = torch.where(mask[:, t].unsqueeze(1), best, score)
        backpointers.append(index)
    last = (score + end).argmax(dim=1).tolist()
    pointers = torch.stack(backpointers).transpose(0, 1).tolist() if backpointers else [[] for _ in last]
    paths = []
    for tag, length, rows in zip(last, mask.sum(dim=1).tolist(), pointers):
        path = [tag]
        for t in range(length - 2, -1, -1):  # rows[t] maps the tag at t + 1 to the best one at t
            tag = rows[t][tag]
            path.append(tag)
        paths.append(path[::-1])
    return paths


class BertCrfTagger(nn.Module):
    """`lstm_hidden` > 0 puts a one-layer BiLSTM (that many units per direction) between the encoder and the
    classifier (BERT-BiLSTM-CRF): a small encoder gets a sequential layer trained for the task alone.
    `pos_vocab` > 0 appends a learned `pos_dim`-wide embedding of each piece's morpheme tag (`bert.pos`) to the
    encoder's output before the BiLSTM / classifier, so a hint the encoder may lack reaches the emissions
    without changing the encoder's own inputs (its pretrained weights see what they saw in pretraining)."""

    def __init__(
        self,
        config: BertConfig,
        num_tags: int,
        classifier_dropout: float | None = None,
        lstm_hidden: int = 0,
        pos_vocab: int = 0,
        pos_dim: int = 32,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_tags = num_tags
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout)
        self.pos_embeddings = nn.Embedding(pos_vocab, pos_dim, padding_idx=0) if pos_vocab > 0 else None
        features = config.hidden_size + (pos_dim if pos_vocab > 0 else 0)
        self.lstm = nn.LSTM(features, lstm_hidden, batch_first=True, bidirectional=True) if lstm_hidden > 0 else None
        self.classifier = nn.Linear(2 * lstm_hidden if lstm_hidden > 0 else features, num_tags)
        self.crf = CRF(num_tags, batch_first=True)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)
        # Allowed moves at decode time; not in the state dict, so checkpoints do not change.
        self.register_buffer("start_allowed", torch.ones(num_tags, dtype=torch.bool), persistent=False)
        self.register_buffer("transitions_allowed", torch.ones(num_tags, num_tags, dtype=torch.bool), persistent=False)

    def constrain(self, start: torch.Tensor | None, transitions: torch.Tensor | None) -> None:
        """Rule out moves at decode time (e.g. `iob2_allowed(labels)`); None = allow everything. Training is
        unchanged: the likelihood still normalises over every path."""
        k = self.num_tags
        self.start_allowed.copy_(torch.ones(k, dtype=torch.bool) if start is None else start)
        self.transitions_allowed.copy_(torch.ones(k, k, dtype=torch.bool) if transitions is None else transitions)

    def emissions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, _ = self.bert(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
        if self.pos_embeddings is not None:
            if pos_ids is None:
                raise ValueError("this tagger was built with POS features (pos_vocab > 0): pass pos_ids")
            hidden = torch.cat([hidden, self.pos_embeddings(pos_ids).to(hidden.dtype)], dim=-1)
        if self.lstm is not None:  # packed, so the backward direction starts at each sentence's own last piece
            lengths = attention_mask.sum(-1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=hidden.size(1))
        return self.classifier(self.dropout(hidden))  # (B, T, H) -> (B, T, num_tags)

    @staticmethod
    def crf_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """[CLS] stays a real (always-O) position, so the mask is a left-aligned run of ones starting at t=0."""
        return attention_mask.bool()

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        tags: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean negative log-likelihood of the gold tag paths. `tags` may hold -100 at padding."""
        mask = self.crf_mask(attention_mask)
        emissions = self.emissions(input_ids, attention_mask, token_type_ids, pos_ids)
        safe_tags = tags.masked_fill(~mask | tags.lt(0), 0)  # the CRF indexes tags even where masked
        log_likelihood = self.crf(emissions.float(), safe_tags, mask=mask, reduction="sum")
        return -log_likelihood / input_ids.size(0)

    @torch.no_grad()
    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Viterbi paths, one list per sentence, as long as its unpadded length, over the allowed moves only."""
        mask = self.crf_mask(attention_mask)
        emissions = self.emissions(input_ids, attention_mask, token_type_ids, pos_ids).float()
        crf = self.crf
        start = crf.start_transitions.float().masked_fill(~self.start_allowed, FORBIDDEN)
        transitions = crf.transitions.float().masked_fill(~self.transitions_allowed, FORBIDDEN)
        return viterbi(emissions, mask, start, transitions, crf.end_transitions.float())
