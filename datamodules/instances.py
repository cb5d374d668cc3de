"""BERT pretraining examples exactly as Google's `create_pretraining_data.py` builds them (pure numpy/python).

Two halves:

- `plan_instances`: Google's `create_instances_from_document` run over sentence LENGTHS only. It decides which
  sentences form segment A and B of every instance and the NSP label, once per seed; the plan is a small int
  table (a_start, a_end, b_start, b_end, a_doc, b_doc) of token offsets into the tokenized corpus.
- `build_example`: what Google does per instance after that (truncation, `[CLS] A [SEP] B [SEP]`, masking),
  run in `__getitem__` with a numpy Generator seeded by (seed, epoch, index): masks change every epoch, yet any
  example can be recomputed from its index.

NSP labels: 0 = IsNext, 1 = NotNext (Google, transformers). The label is not stored, it is DERIVED from the
plan: 1 exactly when B comes from another document than A, so it cannot disagree with the data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

IS_NEXT, NOT_NEXT = 0, 1
IGNORE_INDEX = -100  # label of every position that is not a masked-LM target (torch's cross_entropy default)
PLAN_COLUMNS = ("a_start", "a_end", "b_start", "b_end", "a_doc", "b_doc")
PLAN_CHUNK = 1 << 16


class NotEnoughDocumentsError(ValueError):
    """NotNext pairs need B from a second document; a split with fewer than two usable documents has none."""


# ----------------------------------------------------------------------------------------------------------------
# planning (Google's create_instances_from_document over sentence lengths)


def document_sentences(
    line_offsets: np.ndarray, first_line: int, n_lines: int
) -> tuple[list[int], list[int]]:
    """(starts, ends) in token offsets of the sentences of one document that have at least one token.

    `line_offsets[k]` is the token offset where line k of the sentences file starts, so consecutive sentences
    are contiguous in the token file and a run of sentences is ONE slice.
    """
    offsets = np.asarray(line_offsets[first_line : first_line + n_lines + 1], dtype=np.int64)
    nonempty = offsets[1:] > offsets[:-1]
    return offsets[:-1][nonempty].tolist(), offsets[1:][nonempty].tolist()


def plan_instances(
    line_offsets: np.ndarray,
    documents: np.ndarray,
    doc_ids: Sequence[int],
    max_seq_len: int,
    short_seq_prob: float,
    seed: int | str,
    random_next_prob: float = 0.5,
    balance_nsp: bool = True,
    stats: dict | None = None,
) -> Iterator[np.ndarray]:
    """Yield the plan in int64 chunks of rows (a_start, a_end, b_start, b_end, a_doc, b_doc).

    `documents[d] = (first line, number of sentence lines, ...)`; `doc_ids` are the documents of this split
    (NotNext segments are drawn from these only, so no text crosses a train/val boundary). Follows Google:
    - target length `max_seq_len - 3` ([CLS], [SEP], [SEP]), or with `short_seq_prob` a random length in
      [2, target] (drawn once per document, as Google does), to reduce the pretrain/fine-tune length mismatch;
    - sentences are added to a chunk until it reaches the target or the document ends; A = a random number of
      leading sentences of the chunk, B = the rest (IsNext), or, with probability 1/2 and always when the chunk
      holds one sentence (a one-sentence document, or the last sentence of one), sentences of ANOTHER document
      from a random start (NotNext; the other document is drawn among the others, never re-drawn onto itself);
    - after a NotNext, the chunk's unused sentences are put back (Google's `i -= num_unused_segments`).
    `balance_nsp`: Google's forced NotNext for one-sentence chunks tips the labels (58% NotNext on a petitions
    month with a 2k vocabulary, 55% with 16k: long sentences fill a chunk alone). With `balance_nsp` the
    multi-sentence chunks take NotNext with probability p - (1 - p) * forced / multi (running counts), so the
    share of NotNext stays `random_next_prob` (the paper's 50%) and 0.5 stays the chance level of NSP accuracy.
    `balance_nsp=False` reproduces Google's choice exactly. Nothing else changes.
    Consequence (Google's guarantee): every sentence with at least one token of every usable document of the
    split lies in exactly ONE instance's own-document span (A, or B of an IsNext), before truncation.
    Documents whose sentences all have zero tokens are skipped (counted in `stats["unusable_documents"]`).
    """
    max_num_tokens = max_seq_len - 3
    if max_num_tokens < 2:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for two segments")
    rng = random.Random(seed)
    usable, cache = [], {}
    for doc in doc_ids:
        first, count = int(documents[doc, 0]), int(documents[doc, 1])
        bounds = document_sentences(line_offsets, first, count)
        if bounds[0]:
            usable.append(int(doc))
            if len(cache) < 4096:
                cache[int(doc)] = bounds
    if stats is not None:
        stats["documents"] = len(usable)
        stats["unusable_documents"] = len(doc_ids) - len(usable)
    if len(usable) < 2:
        raise NotEnoughDocumentsError(
            f"{len(usable)} usable document(s): NotNext pairs (label 1) need a second document"
        )

    def bounds_of(doc: int) -> tuple[list[int], list[int]]:
        found = cache.get(doc)
        if found is None:
            found = document_sentences(line_offsets, int(documents[doc, 0]), int(documents[doc, 1]))
        return found

    rows: list[tuple[int, int, int, int, int, int]] = []
    n_usable = len(usable)
    forced = multi = 0  # one-sentence chunks (NotNext by necessity) and chunks where a choice exists
    for position, doc in enumerate(usable):
        starts, ends = bounds_of(doc)
        n = len(starts)
        target = max_num_tokens
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_num_tokens)
        chunk_start, current_length, i = 0, 0, 0
        while i < n:
            current_length += ends[i] - starts[i]
            if i == n - 1 or current_length >= target:
                chunk_len = i - chunk_start + 1
                a_count = rng.randint(1, chunk_len - 1) if chunk_len >= 2 else 1
                a_start, a_end = starts[chunk_start], ends[chunk_start + a_count - 1]
                if chunk_len == 1:
                    forced += 1
                    not_next = True
                else:
                    multi += 1
                    p = random_next_prob
                    if balance_nsp:
                        p = min(1.0, max(0.0, p - (1.0 - p) * forced / multi))
                    not_next = rng.random() < p
                if not_next:
                    # NotNext: draw among the OTHER documents (Google retries 10 times and may still pick the
                    # same document on tiny corpora; this never does).
                    other = rng.randrange(n_usable - 1)
                    other_doc = usable[other + (other >= position)]
                    other_starts, other_ends = bounds_of(other_doc)
                    target_b = target - (a_end - a_start)
                    j = k = rng.randint(0, len(other_starts) - 1)
                    b_length = 0
                    while j < len(other_starts):
                        b_length += other_ends[j] - other_starts[j]
                        j += 1
                        if b_length >= target_b:
                            break
                    rows.append((a_start, a_end, other_starts[k], other_ends[j - 1], doc, other_doc))
                    i -= chunk_len - a_count  # put the unused sentences back
                else:
                    rows.append((a_start, a_end, a_end, ends[i], doc, doc))
                chunk_start, current_length = i + 1, 0
            i += 1
        if len(rows) >= PLAN_CHUNK:
            yield np.asarray(rows, dtype=np.int64)
            rows = []
    if rows:
        yield np.asarray(rows, dtype=np.int64)
    if stats is not None:
        stats["forced_not_next"], stats["chosen_pairs"] = forced, multi


def nsp_labels(plan: np.ndarray) -> np.ndarray:
    """0 = IsNext (B continues A's document), 1 = NotNext (B from another document)."""
    return (plan[:, 4] != plan[:, 5]).astype(np.int64)


def sequence_lengths(plan: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Length of each example after truncation: [CLS] A [SEP] B [SEP]."""
    pair = (plan[:, 1] - plan[:, 0]) + (plan[:, 3] - plan[:, 2])
    return np.minimum(pair, max_seq_len - 3) + 3


# ----------------------------------------------------------------------------------------------------------------
# one example: truncation, layout, masking


@dataclass(frozen=True)
class MaskingConfig:
    vocab_size: int
    mlm_probability: float = 0.15  # BERT paper, section 3.1
    mask_token_prob: float = 0.8  # of the selected tokens: 80% [MASK], 10% random, 10% unchanged (same)
    random_token_prob: float = 0.1
    whole_word_mask: bool = False
    span_mask: bool = False  # SpanBERT: runs of whole words, lengths ~ Geo(span_p) clipped at span_max_words
    span_p: float = 0.2  # SpanBERT's p: mean span length 3.8 words with the clip at 10
    span_max_words: int = 10
    pad_id: int = 0
    cls_id: int = 2
    sep_id: int = 3
    mask_id: int = 4
    first_regular_id: int = 5  # ids below are special tokens: never a target, never a random replacement

    def __post_init__(self) -> None:
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if (
            self.mask_token_prob < 0
            or self.random_token_prob < 0
            or (self.mask_token_prob + self.random_token_prob > 1)
        ):
            raise ValueError("mask_token_prob + random_token_prob must be within [0, 1]")
        if self.span_mask and self.whole_word_mask:
            raise ValueError("span_mask already masks whole words: set whole_word_mask=false")
        if self.span_mask and not (0 < self.span_p <= 1 and self.span_max_words >= 1):
            raise ValueError(
                f"span_p must be in (0, 1], span_max_words >= 1: {self.span_p}, {self.span_max_words}"
            )
        if self.vocab_size <= self.first_regular_id:
            raise ValueError(f"vocab_size {self.vocab_size} holds no regular token")


def truncated_lengths(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """Google's `truncate_seq_pair` lengths: drop one token at a time from the longer segment (B on ties)."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return len_a, len_b
    gap = abs(len_a - len_b)
    if gap >= excess:
        return (len_a - excess, len_b) if len_a > len_b else (len_a, len_b - excess)
    rest = excess - gap  # after evening out, removals alternate starting with B (the tie goes to B)
    even = min(len_a, len_b)
    return even - rest // 2, even - (rest - rest // 2)


def truncate_pair(
    a: np.ndarray, b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Google's `truncate_seq_pair`: each dropped token comes from the front or the back with probability 1/2
    (to add noise; the count taken from the front is therefore Binomial(dropped, 1/2))."""
    keep_a, keep_b = truncated_lengths(len(a), len(b), max_num_tokens)
    out = []
    for segment, keep in ((a, keep_a), (b, keep_b)):
        dropped = len(segment) - keep
        front = int(rng.binomial(dropped, 0.5)) if dropped else 0
        out.append(segment[front : front + keep])
    return out[0], out[1]


def _choose_whole_words(
    ids: np.ndarray, candidates: np.ndarray, n_predict: int, is_continuation: np.ndarray, rng
) -> np.ndarray:
    """Google's whole-word masking: a `##` piece joins the word of the piece right before it; words are taken in
    random order while they fit in `n_predict` (at least one word is always taken)."""
    starts = np.ones(len(candidates), dtype=bool)
    starts[1:] = ~(is_continuation[ids[candidates[1:]]] & (candidates[1:] == candidates[:-1] + 1))
    words = np.split(candidates, np.flatnonzero(starts)[1:])
    chosen: list[np.ndarray] = []
    total = 0
    for w in rng.permutation(len(words)):
        if total + len(words[w]) > n_predict:
            if not chosen:
                chosen.append(words[w])
                total += len(words[w])
            continue
        chosen.append(words[w])
        total += len(words[w])
        if total >= n_predict:
            break
    return np.sort(np.concatenate(chosen))


def span_length_probs(p: float, max_words: int) -> np.ndarray:
    """P(length = 1..max_words): a geometric distribution clipped and renormalised, as SpanBERT draws it."""
    probs = p * (1.0 - p) ** np.arange(max_words)
    return probs / probs.sum()


def _word_table(ids: np.ndarray, candidates: np.ndarray, is_continuation: np.ndarray | None) -> np.ndarray:
    """Candidate index where each word starts, plus len(candidates) at the end. A `##` piece continues the word
    of the piece right before it; a gap (a [SEP] between A and B) always starts a new word."""
    starts = np.ones(len(candidates), dtype=bool)
    adjacent = candidates[1:] == candidates[:-1] + 1
    if is_continuation is not None:
        starts[1:] = ~(is_continuation[ids[candidates[1:]]] & adjacent)
    return np.append(np.flatnonzero(starts), len(candidates))


def choose_spans(
    ids: np.ndarray,
    candidates: np.ndarray,
    n_predict: int,
    config: MaskingConfig,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """SpanBERT's span masking (Joshi et al. 2020, section 3.1; its `PairWithSpanMaskingScheme`), as drawn spans.

    Until `n_predict` positions are chosen: draw a length in words from `span_length_probs`, an anchor
    uniformly among the candidates not chosen yet, and take the words from the anchor's word on, whole, within
    one segment (a span never crosses the [SEP] between A and B). The last span stops at the budget, even
    inside a word, so every example has exactly `n_predict` targets, as in SpanBERT's code. Returns the drawn
    spans as (first, last) candidate indices, overlaps and all: `mask_tokens` merges them.
    """
    bounds = _word_table(ids, candidates, is_continuation)
    word_of = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    gaps = np.append(np.flatnonzero(candidates[1:] != candidates[:-1] + 1) + 1, len(candidates))
    segment_end = np.repeat(gaps, np.diff(np.insert(gaps, 0, 0)))  # first candidate index past the segment
    lengths = np.arange(1, config.span_max_words + 1)
    probs = span_length_probs(config.span_p, config.span_max_words)
    chosen = np.zeros(len(candidates), dtype=bool)
    total, spans = 0, []
    while total < n_predict:
        length = int(rng.choice(lengths, p=probs))
        anchor = int(rng.integers(len(candidates)))
        if chosen[anchor]:
            continue
        first = int(bounds[word_of[anchor]])
        stop = min(int(bounds[min(word_of[anchor] + length, len(bounds) - 1)]), int(segment_end[anchor]))
        last = first
        for index in range(first, stop):
            if total >= n_predict:
                break
            total += int(not chosen[index])
            chosen[index] = True
            last = index
        spans.append((first, last))
    return spans


def _merged(spans: list[tuple[int, int]], candidates: np.ndarray) -> list[np.ndarray]:
    """Positions of the drawn spans, overlapping or adjacent ones merged (SpanBERT's `merge_intervals`)."""
    merged: list[list[int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [candidates[first : last + 1] for first, last in merged]


def mask_tokens(
    ids: np.ndarray,
    candidates: np.ndarray,
    config: MaskingConfig,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Masked-LM corruption of `ids` at `candidates` (positions of non-special tokens).

    round(15%) of the candidates (at least one), drawn WITHOUT replacement; each: [MASK] with p=0.8, a random
    regular token (ids first_regular_id..vocab_size-1) with p=0.1, unchanged otherwise (BERT paper, 3.1).
    Returns (corrupted ids, labels with IGNORE_INDEX everywhere but the targets).
    """
    inputs = ids.copy()
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if len(candidates) == 0:
        return inputs, labels
    n_predict = max(1, int(round(len(candidates) * config.mlm_probability)))
    if config.span_mask:
        return _mask_spans(ids, candidates, n_predict, config, rng, is_continuation)
    if config.whole_word_mask and is_continuation is not None:
        targets = _choose_whole_words(ids, candidates, n_predict, is_continuation, rng)
    else:
        targets = np.sort(rng.choice(candidates, size=min(n_predict, len(candidates)), replace=False))
    labels[targets] = ids[targets]
    draw = rng.random(len(targets))
    masked = targets[draw < config.mask_token_prob]
    randomized = targets[
        (draw >= config.mask_token_prob) & (draw < config.mask_token_prob + config.random_token_prob)
    ]
    inputs[masked] = config.mask_id
    inputs[randomized] = rng.integers(config.first_regular_id, config.vocab_size, size=len(randomized))
    return inputs, labels


def _mask_spans(
    ids: np.ndarray,
    candidates: np.ndarray,
    n_predict: int,
    config: MaskingConfig,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Span masking's corruption: one draw per merged span, so a span is all [MASK], all random tokens or all
    unchanged (SpanBERT's span-level replacement, 80/10/10 as in BERT); labels at every span position."""
    inputs = ids.copy()
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    spans = choose_spans(ids, candidates, n_predict, config, rng, is_continuation)
    for positions in _merged(spans, candidates):
        labels[positions] = ids[positions]
        draw = rng.random()
        if draw < config.mask_token_prob:
            inputs[positions] = config.mask_id
        elif draw < config.mask_token_prob + config.random_token_prob:
            inputs[positions] = rng.integers(config.first_regular_id, config.vocab_size, size=len(positions))
    return inputs, labels


def build_example(
    a: np.ndarray,
    b: np.ndarray,
    max_seq_len: int,
    config: MaskingConfig,
    rng: np.random.Generator,
    is_continuation: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` with token types 0/1, truncated to `max_seq_len`, masked.

    Candidates for masking are the A and B positions whose id is a regular token: [CLS]/[SEP] never, and
    neither an [UNK] (or any other special id) that came from the text.
    """
    a, b = truncate_pair(a, b, max_seq_len - 3, rng)
    n_a = len(a) + 2
    ids = np.empty(n_a + len(b) + 1, dtype=np.int64)
    ids[0] = config.cls_id
    ids[1 : n_a - 1] = a
    ids[n_a - 1] = config.sep_id
    ids[n_a:-1] = b
    ids[-1] = config.sep_id
    token_type_ids = np.zeros(len(ids), dtype=np.int64)
    token_type_ids[n_a:] = 1
    regular = ids >= config.first_regular_id
    regular[[0, n_a - 1, len(ids) - 1]] = False
    input_ids, mlm_labels = mask_tokens(ids, np.flatnonzero(regular), config, rng, is_continuation)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "mlm_labels": mlm_labels}
