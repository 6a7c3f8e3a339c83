"""The real datasets under REFIT_GYM_DATA (skipped locally when absent, failing when CI=true)."""

from __future__ import annotations

import numpy as np
import pytest

from refit_gym.data import load_dataset


@pytest.mark.real_data("diffrec_ml-1m_clean")
def test_diffrec_ml_1m_clean(real_data_dir):
    data = load_dataset("diffrec_ml-1m_clean", data_dir=real_data_dir)
    assert (data.n_users, data.n_items) == (5949, 2810)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (403277, 110722, 57532)
    assert data.train_sequences.lengths.min() == 8 and len(data.train_sequences.items) == 403277
    for split in ("valid", "test"):  # every user held out; held-out items also occur in train
        assert np.all(np.diff(data.split(split).indptr) > 0)
        assert set(data.split(split).indices) <= set(data.train.indices)


@pytest.mark.real_data("diffurec_ml-1m", "movielens-1m_raw_partial")
def test_diffurec_ml_1m(real_data_dir):
    data = load_dataset("diffurec_ml-1m", data_dir=real_data_dir)
    assert (data.n_users, data.n_items) == (6040, 3706)
    assert data.train.nnz == 988129 and len(data.train_sequences.items) == 988129
    assert data.valid.nnz == 6040 and data.test.nnz == 6040
    lengths = data.train_sequences.lengths
    assert (lengths.min(), int(np.median(lengths)), lengths.max()) == (18, 94, 2312)
    assert data.item_titles[0] == "Toy Story (1995)"  # smap raw MovieID 1 -> item 0


@pytest.mark.real_data("diffurec_amazon_beauty")
def test_diffurec_amazon_beauty(real_data_dir):
    data = load_dataset(real_data_dir / "diffurec_amazon_beauty" / "dataset.pkl")
    assert (data.n_users, data.n_items) == (22363, 12101)
    assert len(data.train_sequences.items) == 153776 and data.item_titles is None
    assert data.valid.nnz == 22363 and data.test.nnz == 22363
