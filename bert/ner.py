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
    model: BertCrfTagger,
    tokenizer,
    texts: list[str],
    labels: list[str],
    max_seq_len: int = 128,
    batch_size: int = 32,
) -> list[list[Entity]]:
    """Entities with character spans for raw sentences (wordpiece tags mapped back to characters), batched."""
    from bert.metrics import extract_entities
    from bert.ner_align import encode_for_ner, pieces_to_char_tags
    from bert.pos import analyse, piece_pos_ids

    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encodings = [encode_for_ner(list(text), None, tokenizer, max_seq_len) for text in chunk]
        longest = max(len(enc.input_ids) for enc in encodings)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        pos = torch.zeros_like(ids) if model.pos_embeddings is not None else None  # 0 = [PAD]
        analyses = list(analyse(chunk)) if pos is not None else None
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.input_ids)] = torch.tensor(enc.input_ids)
            mask[row, : len(enc.input_ids)] = 1
            if pos is not None:
                pos[row, : len(enc.input_ids)] = torch.tensor(piece_pos_ids(enc.offsets, analyses[row], len(chunk[row])))
        for text, enc, path in zip(chunk, encodings, model.decode(ids, mask, pos_ids=pos)):
            char_tags = pieces_to_char_tags(enc.offsets, [labels[t] for t in path], len(text))
            spans = sorted(extract_entities(char_tags), key=lambda span: span[1])
            out.append([Entity(text[s:e].strip(), kind, s, e) for kind, s, e in spans])
    return out
