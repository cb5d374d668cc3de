"""WordPiece tokenizer for Korean: training (optionally morpheme-aware, as KLUE does), saving, loading.

The tokenizer is a single `tokenizers.Tokenizer`:

- normalizer: NFC, then BERT's cleaning and CJK-ideograph splitting, lowercasing and accent stripping OFF.
  NFD (what `strip_accents`/`lowercase` imply) decomposes Hangul syllables into conjoining jamo; NFKC
  would map compatibility jamo (ㅋ, U+314B) to conjoining jamo (U+110F). NFC keeps both as they are.
- pre-tokenizer: BERT's whitespace + punctuation split.
- model: WordPiece with `##` continuation pieces; decoder: WordPiece.
- post-processor: `[CLS] $A [SEP]` and `[CLS] $A [SEP] $B:1 [SEP]:1` (token_type_ids 0 / 1).
- special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]` with ids 0..4. Padding is NOT switched on inside
  tokenizer.json (so `encode_batch` returns unpadded encodings with exact offsets); pad with id 0 / `[PAD]`
  in the collate function, or `tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")`. transformers gets
  `[PAD]` from the saved config.

Morpheme-aware training (KLUE, Park et al. 2021, section on tokenization): the training text is first split
at the morpheme starts kiwipiepy finds inside each whitespace word ("이순신은" -> "이순신 은"), so learned
pieces stop at morpheme boundaries. The trained tokenizer is then applied to RAW text as a plain WordPiece;
no analyser runs at encode time and the tokenizer stays one `tokenizer.json`.

The only I/O here is writing and reading the tokenizer folder the caller names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = SPECIAL_TOKENS
CONTINUING_PREFIX = "##"

# Hangul compatibility jamo ㄱ (U+3131) .. ㅣ (U+3163): the emoticon letters of web text (ㅋㅋ, ㅠㅠ). Formal
# corpora such as petitions barely use them, and WordPiece turns a whole word into [UNK] when one character is
# missing from the vocabulary.
HANGUL_COMPAT_JAMO = [chr(code) for code in range(0x3131, 0x3164)]

# Petitions (three months, 6.7 MB) hold ~2,600 distinct characters; 1,000 (the tokenizers default) left 7.8 %
# [UNK] on a held-out month, 3,000 left 0.09 %. Only characters the corpus actually has are kept, so a larger
# limit costs nothing on small corpora; on large ones each kept character costs up to two entries (X, ##X).
DEFAULT_LIMIT_ALPHABET = 4000

# Bumped whenever the recipe below changes in a way that changes the trained vocabulary.
_RECIPE_VERSION = 2  # 2: ids fixed before training (the same texts give the same tokenizer.json)


def build_empty_tokenizer() -> Tokenizer:
    """An untrained WordPiece tokenizer with this project's normalizer, pre-tokenizer, decoder, templates."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN, continuing_subword_prefix=CONTINUING_PREFIX))
    _set_pipeline(tokenizer)
    return tokenizer


def tokenizer_from_vocab(pieces: Iterable[str]) -> Tokenizer:
    """A tokenizer with this project's pipeline over a given vocabulary (ids in the given order; the special
    tokens are put first if missing). For hand-made test vocabularies and for rebuilding after training."""
    pieces = list(dict.fromkeys(pieces))
    pieces = [token for token in SPECIAL_TOKENS if token not in pieces] + pieces
    tokenizer = Tokenizer(
        models.WordPiece(
            {piece: index for index, piece in enumerate(pieces)},
            unk_token=UNK_TOKEN,
            continuing_subword_prefix=CONTINUING_PREFIX,
        )
    )
    _set_pipeline(tokenizer)
    return tokenizer


def _set_pipeline(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
            ),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUING_PREFIX)
    cls_id, sep_id = SPECIAL_TOKENS.index(CLS_TOKEN), SPECIAL_TOKENS.index(SEP_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0",
        pair=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0 $B:1 {SEP_TOKEN}:1",
        special_tokens=[(CLS_TOKEN, cls_id), (SEP_TOKEN, sep_id)],
    )


# ----------------------------------------------------------------------------------------------------------
# morpheme split (training only)


@functools.lru_cache(maxsize=4)
def _kiwi(num_workers: int):
    # imported lazily: loading its model takes ~1-2 s and the plain variant needs none
    from kiwipiepy import Kiwi

    return Kiwi(num_workers=num_workers)


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def split_at_morphemes(text: str, morpheme_starts: Iterable[int]) -> str:
    """Insert a space at every morpheme start that lies strictly inside a whitespace word of `text`."""
    cuts = sorted(
        {
            start
            for start in morpheme_starts
            if 0 < start < len(text) and not text[start].isspace() and not text[start - 1].isspace()
        }
    )
    if not cuts:
        return text
    parts, previous = [], 0
    for cut in cuts:
        parts.append(text[previous:cut])
        previous = cut
    parts.append(text[previous:])
    return " ".join(parts)


def morpheme_split(texts: Iterable[str], num_workers: int | None = None) -> Iterator[str]:
    """Yield each text with spaces inserted at the morpheme starts kiwipiepy finds inside words.

    "이순신은 조선의 무신이다." -> "이순신 은 조선 의 무신 이 다 ." (punctuation is split anyway later).
    Texts are streamed through kiwi's batch API (`num_workers` threads, in input order); morphemes fused
    into one syllable (했 = 하 + 었) share a start offset and are never cut apart.
    """
    kiwi = _kiwi(num_workers or _default_workers())
    for tokens, text in kiwi.tokenize(iter(texts), echo=True):
        yield split_at_morphemes(text, (token.start for token in tokens))


# ----------------------------------------------------------------------------------------------------------
# training


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 16000,
    morpheme_aware: bool = True,
    limit_alphabet: int = DEFAULT_LIMIT_ALPHABET,
    min_frequency: int = 2,
    initial_alphabet: list[str] | None = None,
    show_progress: bool = True,
    num_workers: int | None = None,
) -> Tokenizer:
    """Train a WordPiece tokenizer on `texts` (an iterable of raw strings, consumed once and held in memory:
    pass a sample, as the pretraining DataModule does). The same texts and settings give the same
    tokenizer.json, ids included, on every run and machine.

    `initial_alphabet` defaults to the Hangul compatibility jamo; pass `[]` for none. Every alphabet character
    (initial or among the `limit_alphabet` most frequent, except punctuation and CJK ideographs, which the
    pre-tokenizer always isolates) is both a word start (`ㅋ`) and a continuation (`##ㅋ`), so `ㅋㅋ` or a
    syllable that only started morphemes in training never turns a raw word into [UNK]; these pieces are
    reserved before the merges, so the size is `vocab_size`, or less when no pair reaches `min_frequency`
    any more (a 1.6 MB morpheme-split sample stops near 12k).
    `num_workers` is the number of kiwi threads for the morpheme split (default: CPU count, at most 4).
    """
    if initial_alphabet is None:
        initial_alphabet = HANGUL_COMPAT_JAMO
    initial_alphabet = sorted({normalizers.NFC().normalize_str(char) for char in initial_alphabet})
    tokenizer = build_empty_tokenizer()
    training_texts = list(morpheme_split(texts, num_workers) if morpheme_aware else texts)
    alphabet = choose_alphabet(tokenizer, training_texts, initial_alphabet, limit_alphabet)
    # every character a `##` form: after a morpheme split many syllables only START training words (였 in
    # 하/였/습니다), and without `##였` raw 하였습니다 is one [UNK] (1.3 % [UNK] on a held-out month, not 0.1 %)
    continuations = [CONTINUING_PREFIX + char for char in alphabet if _continues_words(char)]
    # The trainer gives `##X` pieces ids in the order it meets them in a hash map, and breaks ties between
    # equally frequent merges by id, so the same texts gave different ids (and could give different pieces)
    # from run to run (huggingface/tokenizers#1794). Handing it the alphabet and every `##X` up front (as
    # special tokens: the only entries it creates before counting) fixes every id before the first merge.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=SPECIAL_TOKENS + continuations,
        limit_alphabet=len(alphabet),
        initial_alphabet=alphabet,
        continuing_subword_prefix=CONTINUING_PREFIX,
    )
    tokenizer.train_from_iterator(training_texts, trainer=trainer)
    vocab = tokenizer.get_vocab()
    learned = [piece for piece in sorted(vocab, key=vocab.__getitem__) if piece not in SPECIAL_TOKENS]
    singles = [piece for piece in learned if len(piece) == 1]
    reserved = set(continuations)
    merged = [piece for piece in learned if len(piece) > 1 and piece not in reserved]
    # rebuilt so that only the five real special tokens are added tokens; the `##X` ones become plain pieces
    tokenizer = tokenizer_from_vocab(SPECIAL_TOKENS + singles + continuations + merged)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def choose_alphabet(
    tokenizer: Tokenizer, texts: Iterable[str], initial_alphabet: list[str], limit: int | None
) -> list[str]:
    """The characters the trainer would keep: every `initial_alphabet` one, then the most frequent others
    (after the tokenizer's normalizer) up to `limit` in all, ties broken by code point rather than by hash
    order; sorted by code point."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tokenizer.normalizer.normalize_str(text))
    ranked = sorted((char for char in counts if not char.isspace() and char not in initial_alphabet),
                    key=lambda char: (-counts[char], char))  # fmt: skip
    room = len(ranked) if limit is None else max(0, limit - len(initial_alphabet))
    return sorted([*initial_alphabet, *ranked[:room]])


def _continues_words(char: str) -> bool:
    # BERT's pre-tokenizer isolates punctuation and CJK ideographs: they never continue a word, need no `##`
    return not _is_bert_punctuation(char) and not _is_cjk_ideograph(char)


def _is_cjk_ideograph(char: str) -> bool:
    # The ranges BERT's `handle_chinese_chars` splits off as single words: they never continue a word.
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


_CJK_RANGES = [
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
]  # fmt: skip


def _is_bert_punctuation(char: str) -> bool:
    # BertPreTokenizer splits these off as single words (ASCII symbols and Unicode P* categories).
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


# ----------------------------------------------------------------------------------------------------------
# saving and loading


def tokenizer_fingerprint(
    vocab_size: int = 16000,
    morpheme_aware: bool = True,
    limit_alphabet: int = DEFAULT_LIMIT_ALPHABET,
    min_frequency: int = 2,
    initial_alphabet: list[str] | None = None,
    **extra: object,
) -> str:
    """A stable 12-hex-digit hash of the training settings (plus the recipe version, and kiwipiepy's version
    when morpheme-aware, since a new analyser splits differently). Pair it with the corpus checksum as a
    cache key. `extra` takes any further JSON-serialisable setting the caller wants in the key."""
    if initial_alphabet is None:
        initial_alphabet = HANGUL_COMPAT_JAMO
    settings: dict[str, object] = {
        "recipe": _RECIPE_VERSION,
        "vocab_size": vocab_size,
        "morpheme_aware": morpheme_aware,
        "limit_alphabet": limit_alphabet,
        "min_frequency": min_frequency,
        "initial_alphabet": sorted(set(initial_alphabet)),
        **extra,
    }
    if morpheme_aware:
        from importlib.metadata import PackageNotFoundError, version

        try:  # a kiwi update may split differently: its version is part of the key
            settings["kiwipiepy"] = version("kiwipiepy")
        except PackageNotFoundError as err:
            raise ImportError(
                "morpheme-aware tokenizers need kiwipiepy, a dependency of this project (pip install kiwipiepy); "
                "data.morpheme_aware=false trains a plain WordPiece instead"
            ) from err
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def transformers_config(model_max_length: int = 512) -> dict:
    """tokenizer_config.json for transformers. `PreTrainedTokenizerFast` loads tokenizer.json as it is; in
    transformers 5.x `BertTokenizer` would rebuild the normalizer from these flags and drop our NFC step."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "do_lower_case": False,
        "strip_accents": False,
        "tokenize_chinese_chars": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "truncation_side": "right",
        "unk_token": UNK_TOKEN,
        "sep_token": SEP_TOKEN,
        "pad_token": PAD_TOKEN,
        "cls_token": CLS_TOKEN,
        "mask_token": MASK_TOKEN,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int = 512) -> Path:
    """Write tokenizer.json, vocab.txt, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    The folder loads with `transformers.AutoTokenizer.from_pretrained(out_dir)`. Files are written into a
    temporary sibling folder, which is renamed to `out_dir` when that does not exist yet; otherwise each file is
    moved into place with `os.replace`, tokenizer.json last. Either way, once tokenizer.json is visible, the
    folder is complete, and no reader ever sees a half-written file.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab()
    pieces = sorted(vocab, key=vocab.__getitem__)
    if [vocab[token] for token in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
        raise ValueError(f"special tokens must have ids 0..{len(SPECIAL_TOKENS) - 1}: {SPECIAL_TOKENS}")
    if list(range(len(pieces))) != [vocab[piece] for piece in pieces]:
        raise ValueError("vocabulary ids are not contiguous")
    config = transformers_config(model_max_length)
    special_map = {
        key: config[key] for key in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it 0700; the renamed folder should read like any other
        tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "vocab.txt").write_text("".join(piece + "\n" for piece in pieces), encoding="utf-8")
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            (staging / name).write_text(
                json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
            )
        try:
            staging.rename(out_dir)  # a new folder appears complete, in one step
            return out_dir
        except OSError:  # the folder exists already: replace file by file, tokenizer.json last
            out_dir.mkdir(exist_ok=True)
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer from a folder written by `save_tokenizer` or from a `tokenizer.json` file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    return Tokenizer.from_file(str(file))


def unk_rate(tokenizer: Tokenizer, texts: Iterable[str]) -> tuple[float, int]:
    """Share of [UNK] among the wordpieces of `texts` (special tokens not counted), and the piece count."""
    unk_id = tokenizer.token_to_id(UNK_TOKEN)
    n_pieces = n_unk = 0
    batch: list[str] = []

    def count(batch: list[str]) -> None:
        nonlocal n_pieces, n_unk
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            n_pieces += len(encoding.ids)
            n_unk += encoding.ids.count(unk_id)

    for text in texts:
        batch.append(text)
        if len(batch) == 1024:
            count(batch)
            batch = []
    count(batch)
    return (n_unk / n_pieces if n_pieces else 0.0), n_pieces
