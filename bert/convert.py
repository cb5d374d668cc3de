"""Import a local transformers BERT folder (config.json + weights + tokenizer) into this project's model.

    folder = load_hf_folder("path/to/klue-bert-base")   # what `pretrained=hf:<folder>` does
    model = folder.model()                              # bert.model.BertForPreTraining, weights loaded

Our parameter names are transformers' ``BertForPreTraining`` names, so the mapping is a checked identity with
the few differences real folders have: a ``BertModel`` folder has no ``bert.`` prefix and no heads; a
``BertForMaskedLM`` one has no pooler and no NSP head; TF-converted ones say ``LayerNorm.gamma/beta``; the
MLM decoder is tied to the word embeddings and usually left out. Every encoder weight must be present (a
missing or unexpected key is an error naming the file); the pooler and pretraining heads, when the folder
lacks them, come from a fixed-seed fresh init and are listed in ``HfFolder.missing``.

Nothing is downloaded: the folder is read as it is. The tokenizer is the folder's ``tokenizer.json`` (what
a fast tokenizer saves), else a BERT WordPiece rebuilt from ``vocab.txt`` with the folder's
``do_lower_case``/``strip_accents`` settings, which is what transformers would do with it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bert.model import BertConfig, BertForPreTraining, load_state_dict_checked

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
# tensors some transformers versions save that are buffers, not weights
BUFFER_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}  # fmt: skip
# config.json fields that map one to one onto ours
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "layer_norm_eps", "initializer_range",
)  # fmt: skip


def is_hf_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_PREFIX)


@dataclass
class HfFolder:
    """A transformers BERT folder read into our names: config, complete state dict, tokenizer."""

    folder: Path
    config: BertConfig
    state_dict: dict[str, torch.Tensor]  # every BertForPreTraining key (tied copies included)
    weights_file: Path
    tokenizer: Any  # tokenizers.Tokenizer, padding and truncation off (the datamodules do both)
    missing: list[str] = field(default_factory=list)  # keys the folder lacked, taken from a fresh init

    def model(self) -> BertForPreTraining:
        model = BertForPreTraining(self.config)
        load_state_dict_checked(model, self.state_dict, strict=True)
        return model.eval()


def read_config(folder: Path) -> BertConfig:
    """config.json -> BertConfig; refuses what our encoder would compute differently."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json, so {folder} is not a transformers model folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if raw.get("model_type") != "bert":
        raise ValueError(
            f"{path}: model_type is {raw.get('model_type')!r}, not 'bert'; only BERT folders can be imported"
        )
    checks = {
        "hidden_act": (raw.get("hidden_act", "gelu"), "gelu"),  # our encoder computes the exact erf GELU
        "position_embedding_type": (raw.get("position_embedding_type", "absolute"), "absolute"),
        "is_decoder": (bool(raw.get("is_decoder", False)), False),
    }
    for key, (value, wanted) in checks.items():
        if value != wanted:
            raise ValueError(f"{path}: {key}={value!r} is not supported (this model needs {wanted!r})")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if k not in raw]
    if missing:
        raise ValueError(f"{path}: lacks {missing}")
    fields = {k: raw[k] for k in CONFIG_FIELDS if raw.get(k) is not None}
    return BertConfig(**fields, pad_token_id=int(raw.get("pad_token_id") or 0))


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The folder's tensors (safetensors preferred; a .bin only through torch's weights_only loader)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):  # sharded: the index maps each tensor to its shard file
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(_read_weight_file(folder / shard))
            return tensors, path
        return _read_weight_file(path), path
    raise FileNotFoundError(
        f"{folder}: no weights (looked for {', '.join(WEIGHT_FILES)}); a transformers folder saved with "
        "save_pretrained has model.safetensors"
    )


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight shard named in the index is missing")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # never unpickle arbitrary objects from a downloaded folder
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a plain tensor file torch can load with weights_only=True ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def map_keys(
    tensors: dict[str, torch.Tensor], config: BertConfig, source: Path
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers names -> our BertForPreTraining names; (complete state dict, keys filled by a fresh init)."""
    renamed: dict[str, torch.Tensor] = {}
    has_prefix = any(k.startswith("bert.") for k in tensors)
    for key, value in tensors.items():
        new = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if not has_prefix and not new.startswith("cls."):  # a BertModel folder: encoder keys bare
            new = "bert." + new
        if new.endswith(BUFFER_SUFFIXES):
            continue
        renamed[new] = value

    with torch.random.fork_rng():  # what the folder lacks is initialised the same way every time
        torch.manual_seed(0)
        fresh = BertForPreTraining(config).state_dict()
    expected = set(fresh)
    unexpected = sorted(set(renamed) - expected)
    if unexpected:
        raise ValueError(
            f"{source}: {len(unexpected)} tensors this BERT has no place for, e.g. {unexpected[:5]} "
            "(a task head or a different architecture)"
        )
    # tied copies: transformers leaves them out; when present they must equal what they are tied to
    for copy, origin in TIED.items():
        if copy in renamed and origin in renamed and not torch.equal(renamed[copy], renamed[origin]):
            raise ValueError(f"{source}: {copy} differs from {origin}; this model ties them")
        if copy not in renamed and origin in renamed:
            renamed[copy] = renamed[origin]
        if origin not in renamed and copy in renamed:
            renamed[origin] = renamed[copy]
    optional = ("bert.pooler.", "cls.")
    absent = sorted(expected - set(renamed))
    required = [k for k in absent if not k.startswith(optional)]
    if required:
        raise ValueError(f"{source}: {len(required)} encoder tensors missing, e.g. {required[:5]}")
    for key in absent:
        renamed[key] = fresh[key]
    # the fresh init's tied head follows the folder's embedding, never its own random one
    renamed["cls.predictions.decoder.weight"] = renamed["bert.embeddings.word_embeddings.weight"]
    renamed["cls.predictions.decoder.bias"] = renamed["cls.predictions.bias"]
    missing = [k for k in absent if k not in TIED]
    return renamed, missing


def read_tokenizer(folder: Path, config: BertConfig):
    """tokenizer.json if the folder has one, else a BERT WordPiece rebuilt from vocab.txt; checked against
    the model's vocabulary and our padding (id 0)."""
    from tokenizers import Tokenizer

    settings = _tokenizer_settings(folder)
    if (folder / "tokenizer.json").is_file():
        source = folder / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(source))
    elif (folder / "vocab.txt").is_file():
        source = folder / "vocab.txt"
        tokenizer = tokenizer_from_vocab_txt(source, settings)
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer (looked for tokenizer.json and vocab.txt)")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != config.vocab_size:
        raise ValueError(
            f"{source} has {size} tokens but {folder / 'config.json'} says vocab_size {config.vocab_size}: "
            "the tokenizer does not belong to these weights"
        )
    specials = {name: settings.get(f"{name}_token", f"[{name.upper()}]") for name in ("pad", "cls", "sep")}
    ids = {name: tokenizer.token_to_id(token) for name, token in specials.items()}
    if ids["pad"] != 0:
        raise ValueError(f"{source}: pad token {specials['pad']!r} has id {ids['pad']}; our batches pad with id 0")
    if tokenizer.post_processor is None and None not in (ids["cls"], ids["sep"]):
        tokenizer.post_processor = _bert_template(specials["cls"], ids["cls"], specials["sep"], ids["sep"])
    return tokenizer


def _tokenizer_settings(folder: Path) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        path = folder / name
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
            for key, value in raw.items():
                settings[key] = value.get("content") if isinstance(value, dict) and "content" in value else value
    return settings


def _bert_template(cls_token: str, cls_id: int, sep_token: str, sep_id: int):
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
    )


def tokenizer_from_vocab_txt(vocab_txt: Path, settings: dict[str, Any]):
    """BERT's WordPiece over vocab.txt with the normalisation transformers' BertTokenizer applies for the same
    tokenizer_config.json (do_lower_case defaults to True there; strip_accents None follows it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    pieces = vocab_txt.read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        vocab.setdefault(piece, index)
    if len(vocab) != len(pieces):
        raise ValueError(f"{vocab_txt}: {len(pieces) - len(vocab)} duplicate lines")
    lowercase = bool(settings.get("do_lower_case", True))
    strip_accents = settings.get("strip_accents")
    if lowercase or strip_accents:
        # Accent stripping is NFD, which splits Hangul syllables into jamo. transformers does the same
        # with these settings, so the model was trained that way; say so, since it is rarely intended.
        log.warning(
            "%s: do_lower_case=%s strip_accents=%s decompose Hangul syllables into jamo (NFD), as transformers "
            "does with this folder", vocab_txt.parent, lowercase, strip_accents,
        )  # fmt: skip
    unk = settings.get("unk_token", "[UNK]")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(settings.get("tokenize_chinese_chars", True)),
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = settings.get("cls_token", "[CLS]"), settings.get("sep_token", "[SEP]")
    if cls in vocab and sep in vocab:
        tokenizer.post_processor = _bert_template(cls, vocab[cls], sep, vocab[sep])
    return tokenizer


def load_hf_folder(folder: str | os.PathLike, with_weights: bool = True) -> HfFolder:
    """Read a transformers BERT folder; `hf:` in front of the path is accepted. Fails naming the file."""
    text = str(folder)
    folder = Path(text[len(HF_PREFIX) :] if is_hf_ref(text) else text).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (pretrained=hf:<folder of a transformers BERT>)")
    config = read_config(folder)
    tokenizer = read_tokenizer(folder, config)
    state_dict, missing, weights_file = {}, [], folder
    if with_weights:
        tensors, weights_file = read_weights(folder)
        state_dict, missing = map_keys(tensors, config, weights_file)
        if missing:
            log.warning("%s lacks %d tensors (pooler/heads), initialised fresh: %s", weights_file, len(missing),
                        sorted({k.rsplit(".", 1)[0] for k in missing}))  # fmt: skip
    return HfFolder(folder, config, state_dict, weights_file, tokenizer, missing)


def save_tokenizer_json(tokenizer: Any, out_dir: Path) -> Path:
    """Write `tokenizer.json` into `out_dir` atomically (a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json", dir=out_dir)
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, out_dir / "tokenizer.json")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_dir
