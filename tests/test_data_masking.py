"""N-gram (span) masking: span-length distributions, budgets, span boundaries, whole words, the
single-unit stream left unchanged, and the config keys that reach the dataset."""
import types

import numpy as np
import pytest

from megatron_bert.data.dataset import build_pretraining_datasets
from megatron_bert.data.masking import IGNORE_INDEX, mask_tokens, ngram_length_table, pick_spans, random_token_pool
from test_data_dataset import SEQ, check_layout, data, original_tokens, tok  # noqa: F401 (fixtures)

MASK = 4
POOL = random_token_pool(1000, [0, 1, 2, 3, 4])


def first_span_lengths(max_ngrams, distribution, draws=6000):
    """Share of each length among the first spans picked in ``draws`` runs of 400 token units with a
    budget of max_ngrams: the first span is never shortened unless it starts within max_ngrams of the end."""
    cdf = ngram_length_table(max_ngrams, distribution)
    units = 400
    bounds, run_start = np.arange(units + 1), np.arange(units) == 0
    counts = np.zeros(max_ngrams + 1)
    for seed in range(draws):
        w, n = pick_spans(np.random.default_rng(seed), bounds, run_start, max_ngrams, cdf)[0]
        if w <= units - max_ngrams:
            counts[n] += 1
    return counts[1:] / counts.sum()


@pytest.mark.parametrize("distribution,weights", [("harmonic", 1 / np.arange(1, 4)),
                                                   ("geometric", 0.8 ** np.arange(10))])
def test_span_lengths_follow_the_distribution(distribution, weights):
    k = len(weights)
    freq = first_span_lengths(k, distribution)
    expected = weights / weights.sum()
    # 6000 draws: the standard error of a share is below 0.0065; 0.025 is ~4 of them
    np.testing.assert_allclose(freq, expected, atol=0.025)


def test_length_table_renormalises_over_the_room_left():
    cdf = ngram_length_table(3, "harmonic")
    np.testing.assert_allclose(cdf[0, :1], [1.0])
    np.testing.assert_allclose(cdf[1, :2], [2 / 3, 1.0])  # 1 : 1/2
    np.testing.assert_allclose(cdf[2, :3], [6 / 11, 9 / 11, 1.0])  # 1 : 1/2 : 1/3
    assert (cdf[0, 1:] > 1).all()
    with pytest.raises(ValueError, match="max_ngrams=0"):
        ngram_length_table(0)
    with pytest.raises(ValueError, match="poisson"):
        ngram_length_table(3, "poisson")


def labelled_runs(labels):
    """Lengths of the maximal runs of labelled positions."""
    pred = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(np.diff(pred.astype(np.int8)))
    return edges[1::2] - edges[::2]


def test_token_spans_fill_the_budget_and_stay_inside_segments():
    # [CLS] 40 tokens [SEP] 60 tokens [SEP]: spans must not reach across the middle [SEP]
    tokens = np.concatenate([[2], np.arange(100, 140), [3], np.arange(200, 260), [3]])
    eligible = ~np.isin(tokens, [2, 3])
    runs_1, runs_3 = [], []
    for seed in range(300):
        for cdf, runs in ((None, runs_1), (ngram_length_table(3), runs_3)):
            ids, labels = mask_tokens(tokens, eligible, np.random.default_rng(seed), MASK, POOL, 0.15,
                                      ngram_cdf=cdf)
            assert (labels != IGNORE_INDEX).sum() == 15  # round(0.15 * 100): every token unit fits
            assert (labels[~eligible] == IGNORE_INDEX).all()
            np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], tokens[labels != IGNORE_INDEX])
            runs += labelled_runs(labels).tolist()
        # the spans themselves: none reaches from the first segment (units 0..39) into the second
        bounds, run_start = np.arange(101), np.isin(np.arange(100), [0, 40])
        for w, n in pick_spans(np.random.default_rng(seed), bounds, run_start, 15, ngram_length_table(3)):
            assert w + n <= 40 or w >= 40, (seed, w, n)
    # mean span 1 + 3/11 + 2 * 2/11 = 1.64 tokens before neighbouring spans merge
    assert np.mean(runs_1) < 1.3 < 1.6 < np.mean(runs_3)
    # 80/10/10 per token, as for single tokens
    ids, labels = zip(*(mask_tokens(tokens, eligible, np.random.default_rng(s), MASK, POOL, 0.15,
                                    ngram_cdf=ngram_length_table(3)) for s in range(400)))
    ids, labels = np.stack(ids), np.stack(labels)
    chosen = labels != IGNORE_INDEX
    share_mask = (ids[chosen] == MASK).mean()
    share_same = (ids[chosen] == labels[chosen]).mean()
    assert abs(share_mask - 0.8) < 0.03 and abs(share_same - 0.1) < 0.02


def test_max_ngrams_one_is_the_single_unit_stream(data, tok):
    for wwm in (False, True):
        plain, _ = build_pretraining_datasets(data, tok, SEQ, seed=11, whole_word_masking=wwm)
        one, _ = build_pretraining_datasets(data, tok, SEQ, seed=11, whole_word_masking=wwm, max_ngrams=1,
                                            ngram_distribution="geometric")
        assert one.ngram_cdf is None
        for i in range(20):
            np.testing.assert_array_equal(plain[i]["input_ids"], one[i]["input_ids"])
            np.testing.assert_array_equal(plain[i]["labels"], one[i]["labels"])


def test_whole_word_spans_on_samples(data, tok):
    words_ds, _ = build_pretraining_datasets(data, tok, SEQ, seed=12, whole_word_masking=True)
    spans_ds, _ = build_pretraining_datasets(data, tok, SEQ, seed=12, whole_word_masking=True, max_ngrams=3)
    run_len = {}
    for name, ds in (("words", words_ds), ("spans", spans_ds)):
        total_pred = total_elig = 0
        runs = []
        for i in range(200):
            s = ds[i]
            seps = check_layout(s, tok)
            orig = original_tokens(s)
            pred = s["labels"] != IGNORE_INDEX
            n = int(s["attention_mask"].sum())
            total_pred += pred.sum()
            total_elig += n - 3
            for j in range(1, n - 1):  # still whole words: a continuation goes with the piece before it
                if j - 1 not in (0, seps[0]) and j not in seps and not tok.word_start_mask[orig[j]]:
                    assert pred[j] == pred[j - 1], (name, i, j)
            runs += labelled_runs(s["labels"]).tolist()
        assert abs(total_pred / total_elig - 0.15) < 0.02, name
        run_len[name] = np.mean(runs)
    assert run_len["spans"] > 1.3 * run_len["words"]
    # deterministic per index
    np.testing.assert_array_equal(spans_ds[7]["labels"], spans_ds[7]["labels"])


def test_config_keys_reach_the_dataset(tmp_path):
    from omegaconf import OmegaConf

    from megatron_bert.training.checkpointing import SAMPLE_STREAM_KEYS, sample_stream_changes
    from megatron_bert.training.config import ConfigError, compose, validate

    cfg = compose(["data.max_ngrams=3", "data.ngram_distribution=geometric"])
    assert (cfg.data.max_ngrams, cfg.data.ngram_distribution) == (3, "geometric")
    for bad, msg in ((["data.max_ngrams=0"], "data.max_ngrams=0 must be >= 1"),
                     (["data.ngram_distribution=poisson"], "data.ngram_distribution='poisson' is not one of")):
        with pytest.raises(ConfigError, match=msg):
            validate(compose(bad), 1)
    assert {"data.max_ngrams", "data.ngram_distribution"} <= set(SAMPLE_STREAM_KEYS)
    # the trainer's pretraining task builds its datasets with them (train and valid alike)
    import torch

    from megatron_bert.training.pretrain import PretrainTask
    from train_fixtures import build_dataset

    built = build_dataset(tmp_path / "data")
    run = compose(["data=bert", f"data.prefix={built['prefix']}", f"data.tokenizer={built['tokenizer']}",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.seq_length=64", "data.max_ngrams=3",
                   "data.ngram_distribution=geometric", "data.whole_word_masking=true"])
    ps = types.SimpleNamespace(is_main=True, barrier=lambda: None, device=torch.device("cpu"))
    task = PretrainTask(run, ps, lambda s: None)
    task.setup()
    for ds in (task.train_ds, task.valid_ds):
        np.testing.assert_array_equal(ds.ngram_cdf, ngram_length_table(3, "geometric"))
        assert ds.word_start_mask is not None
    saved = OmegaConf.to_container(compose([]))
    assert sample_stream_changes(saved, OmegaConf.to_container(cfg)) == [
        "data.max_ngrams: 1 → 3", "data.ngram_distribution: 'harmonic' → 'geometric'"]
