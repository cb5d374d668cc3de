"""Character <-> wordpiece alignment for character-tagged NER (KLUE-NER). Pure functions, no I/O.

Characters -> pieces: a piece takes the tag of its first character (through the tokenizer's character offsets,
so a `[UNK]` covering a whole word takes that word's first tag, as KLUE-baseline does).
Pieces -> characters: the first character of a piece takes the piece's tag, the following ones `I-<type>`
(`O` stays `O`). Characters no piece covers (spaces, characters cut off by truncation) get `O`.
Scoring follows KLUE: spaces are removed from gold and predicted tags before entity/char F1 (`drop_spaces`).
KLUE tags a space inside a multi-word entity `I-<type>`; scoring spaces as `O` would split such entities.

Long sentences are truncated to `max_seq_len` pieces ([CLS] and [SEP] included), counted in `AlignmentStats`;
the cut-off characters decode to `O`. (KLUE-baseline instead drops them from scoring. Measured on the mirrored
KLUE-NER file with the 16k petitions vocabularies: at most 92 (plain) / 100 (morpheme-aware) positions with
[CLS] and [SEP], so max_seq_len 128 cuts nothing.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bert.metrics import entity_counts, f1_from_counts

IGNORE_INDEX = -100
SPACE = " "  # KLUE-baseline drops exactly the character " " (`if token == " "`), nothing else


def align_tags(encoding_offsets: Sequence[tuple[int, int]], char_tags: Sequence[str]) -> list[str | None]:
    """Tag of each piece = tag of its first character. Pieces with an empty span (special tokens such as
    [CLS]/[SEP], whose offsets are (0, 0)) get None."""
    return [char_tags[start] if end > start else None for start, end in encoding_offsets]


def _inside(tag: str) -> str:
    return "O" if tag == "O" else "I-" + tag[2:]


def pieces_to_char_tags(
    offsets: Sequence[tuple[int, int]], piece_tags: Sequence[str | None], n_chars: int
) -> list[str]:
    """Character tags from piece tags: a piece's first character takes its tag, the rest `I-<type>` (or `O`).
    Characters no piece covers (spaces, truncated tails) get `O`; special tokens (empty span or tag None) are
    skipped."""
    if len(offsets) != len(piece_tags):
        raise ValueError(f"{len(offsets)} offsets but {len(piece_tags)} piece tags")
    char_tags = ["O"] * n_chars
    for (start, end), tag in zip(offsets, piece_tags, strict=True):
        if end <= start or tag is None:
            continue
        char_tags[start] = tag
        inside = _inside(tag)
        for position in range(start + 1, min(end, n_chars)):
            char_tags[position] = inside
    return char_tags


def drop_spaces(chars: Sequence[str], tags: Sequence[str]) -> tuple[list[str], list[str]]:
    """Remove the space characters and their tags, as KLUE's scoring does."""
    if len(chars) != len(tags):
        raise ValueError(f"{len(chars)} characters but {len(tags)} tags")
    kept = [(char, tag) for char, tag in zip(chars, tags, strict=True) if char != SPACE]
    return [char for char, _ in kept], [tag for _, tag in kept]


@dataclass
class AlignmentStats:
    """Counts over the sentences encoded so far. `truncated`: sentences longer than max_seq_len;
    `pieces_cut` / `chars_cut`: pieces dropped and non-space characters left without a piece by truncation."""

    sentences: int = 0
    pieces: int = 0
    truncated: int = 0
    pieces_cut: int = 0
    chars_cut: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class NerEncoding:
    input_ids: list[int]
    offsets: list[tuple[int, int]]  # per position; (0, 0) at [CLS] and [SEP]
    piece_tags: list[str | None]  # None at [CLS] and [SEP]
    truncated: bool


def encode_for_ner(
    chars: Sequence[str],
    char_tags: Sequence[str] | None,
    tokenizer,
    max_seq_len: int = 128,
    stats: AlignmentStats | None = None,
) -> NerEncoding:
    """Encode one character-tagged sentence as `[CLS] pieces [SEP]`, truncated to `max_seq_len` positions.

    `tokenizer` is a `tokenizers.Tokenizer`; the raw text (characters joined) is encoded without its
    post-processor and [CLS]/[SEP] are added here, so the offsets always refer to `chars`. `char_tags` may be
    None at prediction time (piece tags are then all None)."""
    if max_seq_len < 3:
        raise ValueError("max_seq_len must leave room for [CLS], one piece and [SEP]")
    encoding = tokenizer.encode("".join(chars), add_special_tokens=False)
    ids, offsets = list(encoding.ids), [tuple(offset) for offset in encoding.offsets]
    room = max_seq_len - 2
    truncated = len(ids) > room
    if stats is not None:
        stats.sentences += 1
        stats.pieces += min(len(ids), room)
        if truncated:
            stats.truncated += 1
            stats.pieces_cut += len(ids) - room
            covered_until = offsets[room - 1][1]
            stats.chars_cut += sum(1 for char in chars[covered_until:] if char != SPACE)
    ids, offsets = ids[:room], offsets[:room]
    piece_tags = align_tags(offsets, char_tags) if char_tags is not None else [None] * len(ids)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    return NerEncoding(
        input_ids=[cls_id, *ids, sep_id],
        offsets=[(0, 0), *offsets, (0, 0)],
        piece_tags=[None, *piece_tags, None],
        truncated=truncated,
    )


def alignment_ceiling(sentences: Iterable, tokenizer, max_seq_len: int | None = None) -> dict:
    """Entity F1 (strict IOB2, micro and macro) of the gold tags round-tripped character -> piece ->
    character, spaces dropped: the best any wordpiece tagger can score with this tokenizer.

    `sentences`: objects with `.chars` and `.tags` (e.g. `datamodules.klue_ner.NerSentence`) or (chars, tags)
    pairs. `max_seq_len` None means no truncation. Returns entity_f1_micro, entity_f1_macro, per_type,
    chars_per_piece (spaces excluded), sentences_exact (share of sentences whose tags survive unchanged) and
    the AlignmentStats counts.
    """
    stats = AlignmentStats()
    gold_seqs, round_trip_seqs = [], []
    n_chars = exact = 0
    limit = max_seq_len if max_seq_len is not None else 1 << 30
    for sentence in sentences:
        chars, tags = (sentence.chars, sentence.tags) if hasattr(sentence, "chars") else sentence
        encoded = encode_for_ner(chars, tags, tokenizer, limit, stats=stats)
        decoded = pieces_to_char_tags(encoded.offsets, encoded.piece_tags, len(chars))
        _, gold = drop_spaces(chars, tags)
        _, round_trip = drop_spaces(chars, decoded)
        gold_seqs.append(gold)
        round_trip_seqs.append(round_trip)
        n_chars += len(gold)
        exact += gold == round_trip
    scores = f1_from_counts(entity_counts(gold_seqs, round_trip_seqs))
    return {
        "entity_f1_micro": scores["micro"],
        "entity_f1_macro": scores["macro"],
        "per_type": scores["per_type"],
        "chars_per_piece": n_chars / stats.pieces if stats.pieces else 0.0,
        "sentences_exact": exact / stats.sentences if stats.sentences else 0.0,
        **stats.as_dict(),
    }
