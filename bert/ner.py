"""Token tagging head: BERT encoder (no pooler) -> dropout -> linear emissions -> linear-chain CRF.

pytorch-crf needs a bool mask whose first timestep is on and tags that are valid ids everywhere (even under the
mask), and returns a *summed log-likelihood*: this wrapper turns that into a mean negative log-likelihood loss.
The encoder has no pooler so that plain DDP sees no unused parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchcrf import CRF

from bert.model import BertConfig, BertModel


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


@dataclass(frozen=True)
class Entity:
    text: str
    type: str
    start: int  # character offsets into the input, end exclusive
    end: int


@torch.no_grad()
def tag_texts(
    model: BertCrfTagger, tokenizer, texts: list[str], labels: list[str], max_seq_len: int = 128
) -> list[list[Entity]]:
    """Entities with character spans for raw sentences (wordpiece tags mapped back to characters)."""
    from bert.metrics import extract_entities
    from bert.ner_align import encode_for_ner, pieces_to_char_tags

    model.eval()
    device = next(model.parameters()).device
    out = []
    for text in texts:
        enc = encode_for_ner(list(text), None, tokenizer, max_seq_len)
        ids = torch.tensor([enc.input_ids], device=device)
        path = model.decode(ids, torch.ones_like(ids))[0]
        char_tags = pieces_to_char_tags(enc.offsets, [labels[t] for t in path], len(text))
        spans = sorted(extract_entities(char_tags), key=lambda span: span[1])
        out.append([Entity(text[s:e].strip(), kind, s, e) for kind, s, e in spans])
    return out
