"""Google's create_pretraining_data.py rules (datamodules/instances.py), checked on a real petitions month."""

import itertools
import random

import numpy as np
import pytest

from datamodules.instances import (
    IGNORE_INDEX,
    MaskingConfig,
    NotEnoughDocumentsError,
    build_example,
    choose_spans,
    mask_tokens,
    nsp_labels,
    plan_instances,
    span_length_probs,
    truncate_pair,
    truncated_lengths,
)
from datamodules.pretrain import EpochSampler, PretrainDataModule, PretrainingDataset, build_plan, load_tokens
from tests.test_pretrain_data import month_datamodule, shared_base

MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def datamodule(mirror, tmp_path_factory):
    return month_datamodule(shared_base(tmp_path_factory))


@pytest.fixture(scope="module")
def train(datamodule) -> PretrainingDataset:
    return datamodule.datasets["train"]


@pytest.fixture(scope="module")
def examples(train) -> list[dict]:
    """The first 2,500 examples of epoch 0 as the train loader serves them (shuffled by the sampler; the plan
    itself is in corpus order, where the label share drifts with the documents)."""
    return [train[key] for key in itertools.islice(EpochSampler(train, batch_size=32, seed=1234), 2500)]


# ----------------------------------------------------------------------------------------------------------------
# NSP pairs


def test_not_next_never_comes_from_the_same_document(train):
    plan = np.asarray(train.plan)
    labels = nsp_labels(plan)
    assert (plan[labels == 1, 4] != plan[labels == 1, 5]).all()
    is_next = plan[labels == 0]
    assert (is_next[:, 2] == is_next[:, 1]).all()  # IsNext: B is the continuation right after A


def test_is_next_ratio_is_one_half(examples):
    labels = np.array([e["nsp_label"] for e in examples[:2000]])
    assert abs(labels.mean() - 0.5) <= 0.05  # BERT paper 3.1: 50% IsNext, 50% random


def test_google_exact_mode_shows_the_forced_not_next_surplus(datamodule):
    """balance_nsp=False is Google's rule verbatim: one-sentence chunks are always NotNext, the others 50/50."""
    prepared = datamodule._prepare()
    args = (
        prepared["tokens"]["train"],
        prepared["corpora"]["train"],
        prepared["doc_ids"]["train"],
        MAX_SEQ_LEN,
        0.1,
    )
    path, meta = build_plan(*args, seed=5, cache_dir=datamodule.cache_dir / "plans-google", balance_nsp=False)
    plan = np.fromfile(path, dtype=np.int64).reshape(-1, 6)
    not_next = int(nsp_labels(plan).sum())
    chosen_not_next = not_next - meta["forced_not_next"]
    assert abs(chosen_not_next / meta["chosen_pairs"] - 0.5) < 0.03
    assert not_next / len(plan) > 0.53  # the surplus balance_nsp removes


def test_not_next_draws_among_the_other_documents_only_even_with_two_documents():
    # two documents: Google's 10-retry loop could land on the same one; here the other one is the only choice
    line_offsets = np.array([0, 5, 9, 9, 14, 20, 26, 26])  # doc 0: lines 0-1 (+blank 2), doc 1: lines 3-5
    documents = np.array([[0, 2], [3, 3]])
    for seed in range(50):
        plan = np.concatenate(list(plan_instances(line_offsets, documents, [0, 1], 12, 0.5, seed)))
        doc_range = {0: (0, 9), 1: (9, 26)}  # token ranges of the two documents
        for a_start, a_end, b_start, b_end, a_doc, b_doc in plan.tolist():
            assert doc_range[a_doc][0] <= a_start < a_end <= doc_range[a_doc][1]
            assert doc_range[b_doc][0] <= b_start < b_end <= doc_range[b_doc][1]  # B really is in b_doc
            assert a_doc != b_doc or b_start == a_end  # same document only as the continuation (IsNext)


def test_single_document_cannot_make_not_next():
    with pytest.raises(NotEnoughDocumentsError, match="1 usable document"):
        list(plan_instances(np.array([0, 5, 9, 9]), np.array([[0, 2]]), [0], 128, 0.1, 0))


def test_one_sentence_documents_give_not_next_as_google_does():
    # five one-sentence documents: a chunk of one sentence cannot be split, so B always comes from elsewhere
    line_offsets = np.array([0, 7, 7, 10, 10, 12, 12, 20, 20, 21, 21])
    documents = np.array([[0, 1], [2, 1], [4, 1], [6, 1], [8, 1]])
    plan = np.concatenate(list(plan_instances(line_offsets, documents, range(5), 128, 0.1, 0)))
    assert len(plan) == 5 and (nsp_labels(plan) == 1).all()
    assert sorted(plan[:, 4].tolist()) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------------------------
# masking


def test_masked_share_and_80_10_10_split(train, examples):
    vocab_size = train.masking.vocab_size
    candidates = masked = as_mask = as_random = kept = 0
    for example in examples:
        ids, labels = example["input_ids"], example["mlm_labels"]
        target = labels != IGNORE_INDEX
        original = np.where(target, labels, ids)
        candidates += int((original >= 5).sum()) - 0  # [CLS]/[SEP] are < 5 in the original sequence too
        masked += int(target.sum())
        as_mask += int((ids[target] == 4).sum())
        kept += int((ids[target] == labels[target]).sum())
        replaced = ids[target][(ids[target] != 4) & (ids[target] != labels[target])]
        as_random += len(replaced)
        assert (replaced >= 5).all() and (
            replaced < vocab_size
        ).all()  # never a special id, never past the table
    assert candidates >= 10_000
    assert abs(masked / candidates - 0.15) <= 0.01
    assert abs(as_mask / masked - 0.8) <= 0.02
    assert abs(as_random / masked - 0.1) <= 0.02  # a random draw equal to the original counts as "kept"
    assert abs(kept / masked - 0.1) <= 0.02


def test_special_tokens_are_never_targets_and_layout_is_cls_a_sep_b_sep(examples):
    for example in examples:
        ids, types, labels = example["input_ids"], example["token_type_ids"], example["mlm_labels"]
        target = labels != IGNORE_INDEX
        assert target.sum() >= 1
        assert (labels[target] >= 5).all()  # never [PAD]/[UNK]/[CLS]/[SEP]/[MASK]
        original = np.where(target, labels, ids)
        seps = np.flatnonzero(original == 3)
        assert original[0] == 2 and len(seps) == 2 and seps[1] == len(ids) - 1
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 :] == 1).all()
        assert seps[0] >= 2 and seps[1] - seps[0] >= 2  # A and B both hold at least one token
        assert len(ids) <= MAX_SEQ_LEN


def test_lengths_never_exceed_max_seq_len_and_match_the_plan(train):
    lengths = train.lengths()
    assert lengths.max() <= MAX_SEQ_LEN
    for index in range(0, len(train), 97):
        assert len(train[index]["input_ids"]) == lengths[index]
    short = (lengths < MAX_SEQ_LEN - 10).mean()
    assert 0.05 < short < 0.5  # short_seq_prob=0.1 plus document ends


def _plan_args(datamodule) -> tuple:
    """Positional arguments of `build_plan` for the train split (tokens, corpus, documents, seq len, short prob)."""
    prepared = datamodule._prepare()
    return (
        prepared["tokens"]["train"],
        prepared["corpora"]["train"],
        prepared["doc_ids"]["train"],
        MAX_SEQ_LEN,
        0.1,
    )


def _assert_covers_split_once(plan: np.ndarray, datamodule) -> None:
    """Every token of every train document lies in exactly one own-document span (A, or B of an IsNext)."""
    prepared = datamodule._prepare()
    _, line_offsets, _ = load_tokens(prepared["tokens"]["train"])
    documents = np.load(prepared["corpora"]["train"] / "documents.npy")
    spans = np.concatenate([plan[:, [0, 1]], plan[nsp_labels(plan) == 0][:, [2, 3]]])
    spans = spans[np.argsort(spans[:, 0])]
    assert (spans[1:, 0] >= spans[:-1, 1]).all()  # no token of the corpus in two own-document spans
    docs = prepared["doc_ids"]["train"]
    first, count = documents[docs, 0], documents[docs, 1]
    expected = int((line_offsets[first + count] - line_offsets[first]).sum())
    assert int((spans[:, 1] - spans[:, 0]).sum()) == expected  # ... and every token of every document in one


def test_same_seed_same_examples_other_epoch_other_masks(datamodule, train):
    same = PretrainingDataset(
        train.tokens_dir, train.plan_path, len(train), MAX_SEQ_LEN, train.masking, train.seed, "train"
    )
    for index in (0, 7, 1234):
        for key in ("input_ids", "mlm_labels", "token_type_ids"):
            assert (same[index][key] == train[index][key]).all()
    changed = [(train[(1, i)]["mlm_labels"] != train[(0, i)]["mlm_labels"]).any() for i in range(200)]
    assert np.mean(changed) > 0.95
    # the plan itself is a pure function of the seed
    args = _plan_args(datamodule)
    path_a, _ = build_plan(*args, seed=99, cache_dir=datamodule.cache_dir / "plans-test-a")
    path_b, _ = build_plan(*args, seed=99, cache_dir=datamodule.cache_dir / "plans-test-b")
    path_c, _ = build_plan(*args, seed=100, cache_dir=datamodule.cache_dir / "plans-test-b")
    assert path_a.read_bytes() == path_b.read_bytes() != path_c.read_bytes()


def test_every_sentence_of_the_split_is_in_exactly_one_instance(datamodule, train):
    """Google's guarantee: with unused continuation sentences put back after a NotNext, every sentence (with at
    least one token) of every document of the split lies in exactly one instance's own-document span (A, or B
    of an IsNext) per epoch. Truncation may still cut tokens off the ends of a long pair (as in Google)."""
    _assert_covers_split_once(np.asarray(train.plan), datamodule)


def test_dupe_factor_cuts_other_pairs_and_covers_the_corpus_once_per_copy(datamodule):
    """Google's dupe_factor: copy 0 is the plain plan, the other copies pair the same sentences differently,
    each copy alone covers every train token exactly once, and the labels stay 50/50."""
    args = _plan_args(datamodule)
    one, meta_one = build_plan(*args, seed=7, cache_dir=datamodule.cache_dir / "plans-dupe")
    three, meta_three = build_plan(*args, seed=7, cache_dir=datamodule.cache_dir / "plans-dupe", dupe_factor=3)
    rows = lambda path: np.fromfile(path, dtype=np.int64).reshape(-1, 6)  # noqa: E731
    single, tripled = rows(one), rows(three)
    assert meta_three["n_instances"] == len(tripled) and meta_three["documents"] == meta_one["documents"]
    assert meta_three["chosen_pairs"] > 2 * meta_one["chosen_pairs"]  # counts add up over the copies
    assert np.array_equal(tripled[: len(single)], single)
    pair_sets = []
    assert len(meta_three["copy_instances"]) == 3 and meta_three["copy_instances"][0] == len(single)
    for copy in np.split(tripled, np.cumsum(meta_three["copy_instances"])[:-1]):
        _assert_covers_split_once(copy, datamodule)
        assert abs(nsp_labels(copy).mean() - 0.5) < 0.05
        pair_sets.append({tuple(r) for r in copy[:, :4].tolist()})
    assert len(pair_sets[0] & pair_sets[1]) < 0.5 * len(pair_sets[0])  # other A/B cuts and NotNext partners
    with pytest.raises(ValueError, match="dupe_factor"):
        build_plan(*args, seed=7, cache_dir=datamodule.cache_dir / "plans-dupe", dupe_factor=0)


def test_truncation_follows_google_one_token_at_a_time():
    def google(len_a, len_b, max_num):  # truncate_seq_pair, lengths only
        while len_a + len_b > max_num:
            if len_a > len_b:
                len_a -= 1
            else:
                len_b -= 1
        return len_a, len_b

    for len_a in range(1, 40):
        for len_b in range(1, 40):
            assert truncated_lengths(len_a, len_b, 25) == google(len_a, len_b, 25)
    rng = np.random.default_rng(0)
    fronts = []
    for _ in range(2000):
        a, b = truncate_pair(np.arange(100), np.arange(10), 50, rng)
        assert len(a) == 40 and len(b) == 10 and (np.diff(a) == 1).all()
        fronts.append(a[0])
    assert abs(np.mean(fronts) - 30) < 1.0  # 60 tokens dropped, each from the front with p = 1/2


def test_random_replacement_never_uses_special_or_out_of_range_ids():
    config = MaskingConfig(vocab_size=8, mask_token_prob=0.0, random_token_prob=1.0)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        ids = np.full(40, 6)
        out, labels = mask_tokens(ids, np.arange(40), config, rng)
        seen |= set(out[labels != IGNORE_INDEX].tolist())
    assert seen == {5, 6, 7}


def test_whole_word_masking_masks_every_piece_of_a_word():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "대한", "##민국", "##의", "국민", "##은", "청원"]
    continuation = np.array([p.startswith("##") for p in vocab])
    config = MaskingConfig(vocab_size=len(vocab), whole_word_mask=True, mlm_probability=0.3)
    a = np.array([5, 6, 7, 8, 9, 10, 5, 6])  # 대한##민국##의 국민##은 청원 대한##민국
    b = np.array([8, 9, 10, 10, 5, 6, 7])
    words = lambda ids: np.cumsum(~continuation[ids])  # noqa: E731 - word number of every piece
    rng = np.random.default_rng(1)
    for _ in range(200):
        example = build_example(a, b, 64, config, rng, continuation)
        original = np.where(
            example["mlm_labels"] != IGNORE_INDEX, example["mlm_labels"], example["input_ids"]
        )
        target = example["mlm_labels"] != IGNORE_INDEX
        word_of = words(original)
        for word in set(word_of[target]):
            members = (word_of == word) & (original >= 5)
            assert target[members].all()  # all pieces of a chosen word are targets
        assert target.sum() >= 1


def test_plan_rng_is_python_random_with_the_seed_only():
    # same inputs, same seed -> same plan; the plan never depends on global random state
    line_offsets = np.arange(0, 400, 4)
    documents = np.array([[k * 10, 9] for k in range(9)])
    random.seed(1)
    first = np.concatenate(list(plan_instances(line_offsets, documents, range(9), 20, 0.1, 5)))
    random.seed(2)
    second = np.concatenate(list(plan_instances(line_offsets, documents, range(9), 20, 0.1, 5)))
    assert (first == second).all()


def test_whole_word_masking_on_real_petitions(mirror, tmp_path_factory):
    dm = month_datamodule(shared_base(tmp_path_factory), whole_word_mask=True)
    dataset = dm.datasets["train"]
    continuation = dm._continuation_table()
    masked = candidates = 0
    for index in range(300):
        example = dataset[index]
        target = example["mlm_labels"] != IGNORE_INDEX
        original = np.where(target, example["mlm_labels"], example["input_ids"])
        regular = original >= 5
        for pos in np.flatnonzero(regular[1:] & continuation[original[1:]]) + 1:
            if regular[pos - 1]:
                assert target[pos] == target[pos - 1]  # a ## piece is masked iff the piece before it is
        masked += int(target.sum())
        candidates += int(regular.sum())
    assert 0.12 < masked / candidates <= 0.16  # whole words that would overshoot are skipped, as in Google


# ----------------------------------------------------------------------------------------------------------------
# span masking (SpanBERT, Joshi et al. 2020, section 3.1)

SPAN_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "대한", "##민국", "##의", "국민", "##은", "청원"]
SPAN_CONTINUATION = np.array([p.startswith("##") for p in SPAN_VOCAB])


def test_span_lengths_are_spanberts_clipped_geometric():
    probs = span_length_probs(0.2, 10)
    assert probs.sum() == pytest.approx(1.0) and np.allclose(probs[1:] / probs[:-1], 0.8)
    assert (np.arange(1, 11) * probs).sum() == pytest.approx(3.8, abs=0.05)  # the paper: mean 3.8 words


def test_drawn_spans_follow_the_length_distribution_in_whole_words():
    # 4,000 one-piece words in one segment: a drawn span is `length` words unless the budget or the end cuts it
    ids = np.full(4002, 10)  # [CLS] and [SEP] around them do not matter here
    candidates = np.arange(1, 4001)
    config = MaskingConfig(vocab_size=len(SPAN_VOCAB), span_mask=True)
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(20):
        spans = choose_spans(ids, candidates, 600, config, rng, SPAN_CONTINUATION)
        lengths += [last - first + 1 for first, last in spans[:-1] if last < len(candidates) - 1]
    counts = np.bincount(lengths, minlength=11)[1:]
    expected = span_length_probs(0.2, 10) * len(lengths)
    assert len(lengths) > 2000 and ((counts - expected) ** 2 / expected).sum() < 30  # chi2, 9 dof: p < 0.001


def test_span_masking_follows_spanberts_rules():
    config = MaskingConfig(vocab_size=len(SPAN_VOCAB), span_mask=True, mlm_probability=0.3)
    a = np.array([5, 6, 7, 8, 9, 10, 5, 6, 10, 8, 9])  # 대한##민국##의 국민##은 청원 대한##민국 청원 국민##은
    b = np.array([8, 9, 10, 10, 5, 6, 7, 10, 8])
    rng = np.random.default_rng(3)
    draws = {"mask": 0, "other": 0}
    for _ in range(400):
        example = build_example(a, b, 64, config, rng, SPAN_CONTINUATION)
        target = example["mlm_labels"] != IGNORE_INDEX
        original = np.where(target, example["mlm_labels"], example["input_ids"])
        regular = original >= 5
        assert target.sum() == round(regular.sum() * 0.3)  # exactly the budget
        assert not target[~regular].any()  # never [CLS], [SEP]
        runs = np.split(np.flatnonzero(target), np.flatnonzero(np.diff(np.flatnonzero(target)) > 1) + 1)
        cut_inside_a_word = 0
        for run in runs:
            first, last = run[0], run[-1]
            assert not SPAN_CONTINUATION[original[first]] or not regular[first - 1]  # starts a word
            after = last + 1
            cut_inside_a_word += int(regular[after] and SPAN_CONTINUATION[original[after]])
            corrupted = example["input_ids"][run]
            is_mask = corrupted == config.mask_id
            assert is_mask.all() or not is_mask.any()  # one replacement draw for the whole span
            draws["mask" if is_mask.all() else "other"] += 1
        assert cut_inside_a_word <= 1  # only the span that met the budget may stop inside a word
    share = draws["mask"] / (draws["mask"] + draws["other"])
    assert 0.74 < share < 0.86  # 80 % of spans become [MASK]


def test_a_span_never_crosses_the_sep_between_a_and_b():
    config = MaskingConfig(vocab_size=len(SPAN_VOCAB), span_mask=True, span_p=0.01)  # nearly all 10 words long
    ids = np.array([2, 10, 10, 3, 10, 10, 10, 3])
    candidates = np.array([1, 2, 4, 5, 6])
    rng = np.random.default_rng(0)
    for _ in range(200):
        for first, last in choose_spans(ids, candidates, 5, config, rng, SPAN_CONTINUATION):
            assert (candidates[first] <= 2) == (candidates[last] <= 2)


def test_span_and_whole_word_masking_are_exclusive():
    with pytest.raises(ValueError, match="span_mask already masks whole words"):
        MaskingConfig(vocab_size=20, span_mask=True, whole_word_mask=True)
    with pytest.raises(ValueError, match="data.span_mask already masks whole words"):  # at once, no preparation
        PretrainDataModule(files=[{"name": "x"}], format="petitions", span_mask=True, whole_word_mask=True)


def test_span_masking_on_real_petitions(mirror, tmp_path_factory):
    dm = month_datamodule(shared_base(tmp_path_factory), span_mask=True)
    dataset = dm.datasets["train"]
    masked = candidates = 0
    run_lengths = []
    for index in range(300):
        example = dataset[index]
        target = example["mlm_labels"] != IGNORE_INDEX
        regular = np.where(target, example["mlm_labels"], example["input_ids"]) >= 5
        assert target.sum() == max(1, round(regular.sum() * 0.15))
        positions = np.flatnonzero(target)
        run_lengths += [len(r) for r in np.split(positions, np.flatnonzero(np.diff(positions) > 1) + 1)]
        masked += int(target.sum())
        candidates += int(regular.sum())
    assert 0.14 < masked / candidates < 0.16
    assert np.mean(run_lengths) > 3.0  # contiguous runs of pieces, where token masking gives ~1.2
