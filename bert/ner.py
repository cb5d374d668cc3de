"""NER inference on raw text: entities with character spans from the CRF tagger (`bert.heads.BertCrfTagger`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bert.heads import BertCrfTagger

__all__ = ["BertCrfTagger", "Entity", "tag_texts"]  # the tagger lives in bert.heads; re-exported here


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
