"""bert/model.py against transformers' BertForPreTraining, plus shapes, tying, vocab guards and presets."""

import pytest
import torch
import torch.nn.functional as F

from bert.heads import BertForSequenceClassification
from bert.model import (
    PRESETS,
    BertConfig,
    BertForPreTraining,
    BertModel,
    BertSelfAttention,
    check_vocab,
    count_parameters,
    load_state_dict_checked,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-5
# transformers' own tiny test shape
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


@pytest.fixture
def config() -> BertConfig:
    return BertConfig(**TINY)


@pytest.fixture
def batch():
    """Three sequences of lengths 12, 9 and 5 (pad at the end), two segments each, ~30% of tokens masked."""
    g = torch.Generator().manual_seed(0)
    lengths, T = [12, 9, 5], 12
    input_ids = torch.randint(5, TINY["vocab_size"], (3, T), generator=g)
    attention_mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long()
    token_type_ids = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        token_type_ids[i, n // 2 : n] = 1
    input_ids[attention_mask == 0] = 0
    masked_positions = (torch.rand(3, T, generator=g) < 0.3) & attention_mask.bool()
    masked_positions[:, 1] = True  # at least one per row
    return input_ids, token_type_ids, attention_mask, masked_positions


def hf_model(config: BertConfig):
    return transformers.BertForPreTraining(transformers.BertConfig(**config.to_transformers_dict()))


def assert_parity(ours: BertForPreTraining, theirs, batch) -> dict[str, float]:
    input_ids, token_type_ids, attention_mask, masked_positions = batch
    ours.eval(), theirs.eval()
    keep = attention_mask.bool()
    with torch.no_grad():
        hidden, _ = ours.bert(input_ids, token_type_ids, attention_mask)
        sparse = ours(input_ids, token_type_ids, attention_mask, masked_positions)
        full = ours(input_ids, token_type_ids, attention_mask)
        ref = theirs(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
        )
    assert sparse.mlm_logits.shape == (int(masked_positions.sum()), TINY["vocab_size"])
    diffs = {
        "hidden": (hidden - ref.hidden_states[-1])[keep].abs().max().item(),
        "mlm_masked": (sparse.mlm_logits - ref.prediction_logits[masked_positions]).abs().max().item(),
        "mlm_full": (full.mlm_logits - ref.prediction_logits)[keep].abs().max().item(),
        "nsp": (sparse.nsp_logits - ref.seq_relationship_logits).abs().max().item(),
    }
    assert all(d <= TOL for d in diffs.values()), diffs
    return diffs


def test_parity_our_init_into_transformers(config, batch):
    torch.manual_seed(0)
    ours = BertForPreTraining(config)
    theirs = hf_model(config)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # what the state dicts leave out are transformers' non-persistent buffers, nothing else
    assert {n for n, _ in theirs.named_buffers()} == {
        "bert.embeddings.position_ids",
        "bert.embeddings.token_type_ids",
    }
    assert theirs.cls.predictions.decoder.weight is theirs.bert.embeddings.word_embeddings.weight
    assert_parity(ours, theirs, batch)


def test_parity_transformers_init_into_ours(config, batch):
    torch.manual_seed(1)
    theirs = hf_model(config)
    ours = BertForPreTraining(config)
    result = load_state_dict_checked(ours, theirs.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert_parity(ours, theirs, batch)


def test_init_matches_bert(config):
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    emb = model.bert.embeddings.word_embeddings.weight
    assert torch.all(emb[config.pad_token_id] == 0)  # transformers zeroes the padding row too
    assert abs(emb[1:].std().item() - config.initializer_range) < 0.002
    assert torch.all(model.cls.predictions.bias == 0)
    assert torch.all(model.bert.encoder.layer[0].output.LayerNorm.weight == 1)
    assert torch.all(model.cls.seq_relationship.bias == 0)


def test_bert_model_shapes(config, batch):
    input_ids, token_type_ids, attention_mask, _ = batch
    hidden, pooled = BertModel(config)(input_ids, token_type_ids, attention_mask)
    assert hidden.shape == (3, 12, 32) and pooled.shape == (3, 32)

    encoder = BertModel(config, add_pooling_layer=False)
    hidden, pooled = encoder(input_ids)  # token_type_ids and attention_mask optional
    assert hidden.shape == (3, 12, 32) and pooled is None
    assert not any(name.startswith("pooler") for name, _ in encoder.named_parameters())


def test_mean_pooled_head_is_the_masked_mean_of_transformers_hidden_states(config, batch):
    """`pooling="mean"`: the classifier reads the mean of transformers' last hidden state over the attention
    mask (Sentence-BERT's pooling), has no pooler, and a row's logits do not depend on how much it is padded."""
    input_ids, token_type_ids, attention_mask, _ = batch
    torch.manual_seed(0)
    ours = BertForSequenceClassification(config, num_labels=3, pooling="mean").eval()
    assert ours.bert.pooler is None and not any("pooler" in name for name, _ in ours.named_parameters())
    theirs = transformers.BertModel(transformers.BertConfig(**config.to_transformers_dict()), add_pooling_layer=False)
    result = theirs.load_state_dict(ours.bert.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        hidden = theirs.eval()(input_ids=input_ids, token_type_ids=token_type_ids,
                               attention_mask=attention_mask).last_hidden_state  # fmt: skip
        mean = torch.stack([hidden[i, : int(n)].mean(0) for i, n in enumerate(attention_mask.sum(1))])
        reference = ours.classifier(mean)
        logits = ours(input_ids, token_type_ids, attention_mask)
        alone = ours(input_ids[2:, :5], token_type_ids[2:, :5], attention_mask[2:, :5])  # row 2 unpadded
    assert (logits - reference).abs().max().item() <= TOL
    assert (alone - logits[2:]).abs().max().item() <= TOL
    with torch.no_grad():  # [CLS] pooling reads position 0 only: a different answer from the same encoder
        cls = BertForSequenceClassification(config, num_labels=3, pooling="cls").eval()
        cls.bert.load_state_dict(ours.bert.state_dict(), strict=False)
        cls.classifier.load_state_dict(ours.classifier.state_dict())
        assert (cls(input_ids, token_type_ids, attention_mask) - logits).abs().max().item() > TOL
    with pytest.raises(ValueError, match="pooling must be one of"):
        BertForSequenceClassification(config, num_labels=3, pooling="max")


def test_pretraining_shapes(config, batch):
    input_ids, token_type_ids, attention_mask, masked_positions = batch
    model = BertForPreTraining(config)
    out = model(input_ids, token_type_ids, attention_mask, masked_positions)
    assert out.mlm_logits.shape == (int(masked_positions.sum()), 99)
    assert out.nsp_logits.shape == (3, 2)
    out = model(input_ids, token_type_ids, attention_mask)
    assert out.mlm_logits.shape == (3, 12, 99) and out.nsp_logits.shape == (3, 2)
    mlm_logits, nsp_logits = out  # a NamedTuple: unpacks like a tuple
    assert mlm_logits is out.mlm_logits


def test_decoder_tied_to_word_embeddings(config, batch):
    input_ids, token_type_ids, attention_mask, masked_positions = batch
    model = BertForPreTraining(config)
    emb = model.bert.embeddings.word_embeddings
    decoder = model.cls.predictions.decoder
    assert decoder.weight is emb.weight and decoder.weight.data_ptr() == emb.weight.data_ptr()
    assert decoder.bias is model.cls.predictions.bias

    labels = torch.randint(0, 99, (int(masked_positions.sum()),))
    out = model(input_ids, token_type_ids, attention_mask, masked_positions)
    F.cross_entropy(out.mlm_logits, labels).backward()
    unused = torch.ones(99, dtype=torch.bool)
    unused[input_ids.unique()] = False
    # rows of tokens absent from the input get gradient only through the output projection
    assert emb.weight.grad[unused].abs().sum() > 0
    assert model.cls.predictions.bias.grad.abs().sum() > 0


def test_attention_dropout_only_in_training(config, batch):
    input_ids, token_type_ids, attention_mask, _ = batch
    model = BertModel(BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5))

    def twice():
        return [model(input_ids, token_type_ids, attention_mask)[0] for _ in range(2)]

    model.eval()
    assert torch.equal(*twice())
    model.train()
    assert not torch.allclose(*twice())


def test_attention_dropout_is_unbiased():
    """Inverted dropout keeps the expectation: the mean of many training outputs of one attention layer is
    its eval output, so the explicit path's 1/(1-p), folded into the value weight, is applied exactly once."""
    torch.manual_seed(0)
    layer = BertSelfAttention(BertConfig(**TINY, attention_probs_dropout_prob=0.3))
    x = torch.randn(4, 7, TINY["hidden_size"])
    mask = torch.zeros(4, 1, 1, 7).masked_fill(torch.arange(7) >= 5, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = layer.eval()(x, mask)
        layer.train()
        mean = torch.stack([layer(x, mask) for _ in range(4000)]).mean(0)
        assert not torch.allclose(layer(x, mask), expected, atol=1e-3)  # dropout is on
    # a missing or doubled 1/(1-p) would be off by ~30%; the sampling error here is ~1%
    assert torch.allclose(mean, expected, rtol=0.05, atol=0.02), (mean - expected).abs().max()


def test_parameter_count_matches_transformers(config):
    ours = BertForPreTraining(config)
    assert count_parameters(ours) == hf_model(config).num_parameters() == 35599
    no_pooler = BertModel(config, add_pooling_layer=False)
    assert count_parameters(no_pooler) == count_parameters(BertModel(config)) - (32 * 32 + 32)
    ours.bert.embeddings.requires_grad_(False)
    assert count_parameters(ours) < count_parameters(ours, trainable_only=False) == 35599


def test_checkpoint_with_other_vocab_fails_clearly(config):
    other = BertForPreTraining(BertConfig(**{**TINY, "vocab_size": 120}))
    with pytest.raises(ValueError, match="checkpoint has vocab 120, tokenizer has 99"):
        load_state_dict_checked(BertForPreTraining(config), other.state_dict())
    with pytest.raises(ValueError, match="checkpoint has vocab 120, tokenizer has 99"):
        load_state_dict_checked(BertModel(config, add_pooling_layer=False), other.state_dict())
    with pytest.raises(ValueError, match="tokenizer has 120"):
        check_vocab(config, 120)
    check_vocab(config, 99)


def test_pretraining_weights_load_into_encoder(config, batch):
    input_ids, token_type_ids, attention_mask, _ = batch
    pretrained = BertForPreTraining(config).eval()
    for pooler in (True, False):
        encoder = BertModel(config, add_pooling_layer=pooler).eval()
        load_state_dict_checked(encoder, pretrained.state_dict())
        with torch.no_grad():
            expected = pretrained.bert(input_ids, token_type_ids, attention_mask)[0]
            assert torch.equal(encoder(input_ids, token_type_ids, attention_mask)[0], expected)


def test_out_of_range_input_ids_fail_clearly(config):
    model = BertModel(config)
    with pytest.raises(ValueError, match=r"input ids span \[0, 99\] but the vocab has 99"):
        model(torch.tensor([[2, 5, 99, 0]]))
    with pytest.raises(ValueError, match="vocab has 99"):
        model(torch.tensor([[2, -1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 513, dtype=torch.long))


def test_config_round_trips(config):
    assert BertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown BertConfig keys"):
        BertConfig.from_dict({**config.to_dict(), "hidden_sise": 64})
    hf = transformers.BertConfig(**config.to_transformers_dict())
    assert (hf.hidden_act, hf.model_type, hf.vocab_size, hf.intermediate_size) == ("gelu", "bert", 99, 37)
    with pytest.raises(ValueError, match="not a multiple"):
        BertConfig(vocab_size=99, hidden_size=30, num_attention_heads=4)


# (layers, hidden, heads, FFN) from Turc et al. 2019 and BERT-base
@pytest.mark.parametrize(
    "name, shape",
    [
        ("tiny", (2, 128, 2, 512)),
        ("mini", (4, 256, 4, 1024)),
        ("small", (4, 512, 8, 2048)),
        ("medium", (8, 512, 8, 2048)),
        ("base", (12, 768, 12, 3072)),
    ],
)
def test_presets(name, shape):
    cfg = BertConfig.from_preset(name, vocab_size=99)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == shape
    assert PRESETS[name] == shape[:2]


def test_preset_overrides_and_model_shapes():
    cfg = BertConfig.from_preset("tiny", vocab_size=99, max_position_embeddings=128, hidden_dropout_prob=0.0)
    assert (cfg.max_position_embeddings, cfg.hidden_dropout_prob, cfg.hidden_size) == (128, 0.0, 128)
    model = BertForPreTraining(cfg)
    assert len(model.bert.encoder.layer) == 2
    assert model.bert.encoder.layer[1].intermediate.dense.weight.shape == (512, 128)
    with pytest.raises(ValueError, match="unknown preset"):
        BertConfig.from_preset("huge", vocab_size=99)
