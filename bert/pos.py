"""Morpheme part-of-speech features for the NER tagger: kiwipiepy's tag of the morpheme under each wordpiece.

Why: KLUE-NER's name types are where a small encoder is weakest (LC, OG near 0.5 test F1), and kiwi's
proper-noun tag is a strong, cheap hint: on the mirrored dev file 80 % of PS and LC characters and 59 % of OG
characters lie in an `NNP` morpheme, against 1.9 % of the characters outside entities. The encoder learns this
from context only as far as 60 minutes of pretraining allow; the tag comes from kiwi's own model, trained on
other corpora, so it holds no KLUE label.

A piece gets `B-<tag>` when its first character starts a morpheme and `I-<tag>` when it starts inside one
(kiwi's irregular-conjugation suffixes `-R`/`-I` are dropped: `VV-R` -> `VV`); [CLS]/[SEP] and padding get
`[PAD]` (id 0), a tag kiwi adds later `[UNK]`. Pure functions apart from `analyse`, which runs kiwi.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

# kiwipiepy's tag set (0.24): nouns, predicates, modifiers, particles, endings, affixes, symbols, web tokens.
KIWI_TAGS: tuple[str, ...] = (
    "NNG", "NNP", "NNB", "NR", "NP", "VV", "VA", "VX", "VCP", "VCN", "MM", "MAG", "MAJ", "IC",
    "JKS", "JKC", "JKG", "JKO", "JKB", "JKV", "JKQ", "JX", "JC", "EP", "EF", "EC", "ETN", "ETM",
    "XPN", "XSN", "XSV", "XSA", "XSM", "XR", "SF", "SP", "SS", "SSO", "SSC", "SE", "SO", "SW", "SL", "SH",
    "SN", "SB", "UN", "W_URL", "W_EMAIL", "W_HASHTAG", "W_MENTION", "W_SERIAL", "W_EMOJI", "Z_CODA", "Z_SIOT",
)  # fmt: skip
POS_LABELS: tuple[str, ...] = ("[PAD]", "[UNK]") + tuple(f"{p}-{tag}" for tag in KIWI_TAGS for p in ("B", "I"))
PAD_ID, UNK_ID = 0, 1
_POS_ID = {label: index for index, label in enumerate(POS_LABELS)}

Span = tuple[int, int, str]  # (start, end exclusive, tag): one morpheme, character offsets into the text


def base_tag(tag: str) -> str:
    """`VV-R` -> `VV`; tags without a suffix unchanged."""
    return tag.split("-", 1)[0]


def piece_pos_ids(offsets: Sequence[tuple[int, int]], spans: Sequence[Span], n_chars: int) -> list[int]:
    """POS label id of each piece: the morpheme covering its first character, B- if the piece starts it.

    Pieces with an empty span ([CLS], [SEP]) and characters no morpheme covers (spaces) get `[PAD]`. Where
    kiwi fuses morphemes into one syllable (했 = 하 + 었, same start), the first one names the character."""
    tag_at: list[str | None] = [None] * n_chars
    starts_at = [False] * n_chars
    for start, end, tag in spans:
        start, end = max(0, int(start)), min(n_chars, int(end))
        if start >= end:
            continue
        if tag_at[start] is None:
            starts_at[start] = True
        for position in range(start, end):
            if tag_at[position] is None:
                tag_at[position] = base_tag(tag)
    ids = []
    for start, end in offsets:
        if end <= start or start >= n_chars or tag_at[start] is None:
            ids.append(PAD_ID)
            continue
        ids.append(_POS_ID.get(f"{'B' if starts_at[start] else 'I'}-{tag_at[start]}", UNK_ID))
    return ids


def analyse(texts: Iterable[str], num_workers: int | None = None) -> Iterator[list[Span]]:
    """kiwi's morphemes of each text, in input order, as (start, end, tag) character spans."""
    from bert.tokenizer import _default_workers, _kiwi

    kiwi = _kiwi(num_workers or _default_workers())
    for tokens in kiwi.tokenize(iter(texts)):
        yield [(int(token.start), int(token.start + token.len), str(token.tag)) for token in tokens]
