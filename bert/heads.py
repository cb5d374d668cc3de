"""Task heads on the BERT encoder, with transformers' parameter names so that they export unchanged.

- `BertForSequenceClassification`: pooled [CLS] -> dropout -> linear (`classifier.weight/bias`), as
  transformers' class of that name; `num_labels == 1` is regression (MSE), otherwise cross-entropy.
- `BertCrfTagger`: token emissions -> linear-chain CRF (KLUE-NER). pytorch-crf needs a bool mask whose first
  timestep is on and valid tag ids everywhere (even under the mask), and returns a *summed log-likelihood*:
  the wrapper turns that into a mean negative log-likelihood. Its encoder has no pooler, so that plain DDP
  sees no unused parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF

from bert.model import BertConfig, BertModel


class BertForSequenceClassification(nn.Module):
    """Sentence and sentence-pair tasks (NLI, STS, topic): one vector per input from the pooler."""

    def __init__(self, config: BertConfig, num_labels: int, classifier_dropout: float | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
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
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, C)
        return self.classifier(self.dropout(pooled))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)


class BertCrfTagger(nn.Module):
    def __init__(self, config: BertConfig, num_tags: int, classifier_dropout: float | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_tags = num_tags
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob if classifier_dropout is None else classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, num_tags)
        self.crf = CRF(num_tags, batch_first=True)
        nn.init.normal_(self.classifier.weight, std=config.initializer_range)
        nn.init.zeros_(self.classifier.bias)

    def emissions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden, _ = self.bert(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
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
    ) -> torch.Tensor:
        """Mean negative log-likelihood of the gold tag paths. `tags` may hold -100 at padding."""
        mask = self.crf_mask(attention_mask)
        emissions = self.emissions(input_ids, attention_mask, token_type_ids)
        safe_tags = tags.masked_fill(~mask | tags.lt(0), 0)  # the CRF indexes tags even where masked
        log_likelihood = self.crf(emissions.float(), safe_tags, mask=mask, reduction="sum")
        return -log_likelihood / input_ids.size(0)

    @torch.no_grad()
    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Viterbi paths, one list per sentence, as long as its unpadded length."""
        mask = self.crf_mask(attention_mask)
        emissions = self.emissions(input_ids, attention_mask, token_type_ids)
        return self.crf.decode(emissions.float(), mask=mask)
