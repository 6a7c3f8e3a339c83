"""Loading raw rating files (MovieLens ratings.dat, u.data, CSV) with the chronological split."""

from __future__ import annotations

import numpy as np
import pytest

from refit_gym.data import load_ratings
from refit_gym.errors import DataError

# (user, item, rating, timestamp) rows in file order. Every user rates items 100..109 with 5
# and item 110 with 2 (below the threshold). User 10's file order is anti-chronological.
ROWS = (
    [(10, 100 + k, 5, 1000 - k) for k in range(10)]
    + [(10, 110, 2, 2000)]
    + [(20, 109 - k, 5, 1000 + k) for k in range(10)]
    + [(20, 110, 1, 5)]
    + [(30, 100 + k, 5, 3000 + k) for k in range(10)]
    + [(30, 110, 3, 1)]
)
TITLES = {100 + k: f"Movie {k} (199{k})" for k in range(11)}


def _write_movielens(folder, rows=ROWS, with_titles=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    if with_titles:
        (folder / "movies.dat").write_bytes(
            "".join(f"{i}::{title}::Drama|Comédie\n" for i, title in TITLES.items()).encode("latin-1")
        )
    return folder / "ratings.dat"


def _check_expected_split(data):
    assert (data.n_users, data.n_items) == (3, 10)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (21, 6, 3)
    assert data.extras["raw_user_ids"].tolist() == [10, 20, 30]
    assert data.extras["raw_item_ids"].tolist() == list(range(100, 110))
    # user 10 (id 0): chronological order is the reverse of the file order
    assert data.train_sequences[0].tolist() == [9, 8, 7, 6, 5, 4, 3]
    assert data.valid[0].indices.tolist() == [1, 2] and data.test[0].indices.tolist() == [0]
    assert data.train_sequences[1].tolist() == [9, 8, 7, 6, 5, 4, 3]
    assert data.train_sequences[2].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert data.test[2].indices.tolist() == [9]


def test_movielens_dat_with_titles(tmp_path):
    data = load_ratings(_write_movielens(tmp_path / "ml-toy"))
    _check_expected_split(data)
    assert data.name == "ml-toy"
    assert data.item_titles[0] == "Movie 0 (1990)" and len(data.item_titles) == 10


def test_u_data_tab_separated(tmp_path):
    path = tmp_path / "u.data"
    path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    data = load_ratings(path)
    _check_expected_split(data)
    assert data.item_titles is None and data.extras["file_format"] == "udata"


def test_csv_with_header_and_rating_threshold(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ROWS))
    _check_expected_split(load_ratings(path))
    # threshold 1: item 110 becomes positive for everyone
    assert load_ratings(path, min_rating=1).n_items == 11


def test_csv_without_rating_counts_every_row_and_string_ids(tmp_path):
    path = tmp_path / "clicks.tsv"
    lines = "".join(f"u{u}\titem-{i}\t{t}\n" for u, i, _, t in ROWS)
    path.write_text("user\titem\ttimestamp\n" + lines)
    data = load_ratings(path)
    assert data.n_users == 3 and data.extras["raw_user_ids"].tolist() == ["u10", "u20", "u30"]
    assert "item-110" in data.extras["raw_item_ids"].tolist()  # no rating column: all positive


def test_random_log_respects_the_protocol(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for user in range(60):
        for item in rng.choice(40, size=rng.integers(4, 25), replace=False):
            rows.append((user + 1, int(item) + 1, int(rng.integers(1, 6)), int(rng.integers(10**9, 10**9 + 10**6))))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    data = load_ratings(_write_movielens(tmp_path / "random", rows, with_titles=False))
    time_of = {(u, i): t for u, i, r, t in rows if r >= 4}
    raw_users, raw_items = data.extras["raw_user_ids"], data.extras["raw_item_ids"]
    train_items = set(data.train.indices.tolist())
    for user in range(data.n_users):
        times = {
            split: [time_of[(raw_users[user], raw_items[i])] for i in data.split(split)[user].indices]
            for split in ("train", "valid", "test")
        }
        sequence_times = [time_of[(raw_users[user], raw_items[i])] for i in data.train_sequences[user]]
        assert sequence_times == sorted(sequence_times) and sorted(sequence_times) == sorted(times["train"])
        assert max(times["train"]) <= min(times["valid"]) and max(times["valid"]) <= min(times["test"])
        assert set(data.valid[user].indices) | set(data.test[user].indices) <= train_items
    assert data.train.multiply(data.valid).nnz == 0 and data.valid.multiply(data.test).nnz == 0


@pytest.mark.parametrize(
    "content, problem",
    [
        ("1::100::5::1000\n1::101::5\n", "line 2"),
        ("1::100::5::1000\n\n1::abc::5::1001\n", "line 3"),
        ("1::100::five::1000\n", "line 1"),
    ],
)
def test_malformed_movielens_line_names_file_line_and_content(tmp_path, content, problem):
    path = tmp_path / "ratings.dat"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_ratings(path)
    message = str(error.value)
    assert "ratings.dat" in message and problem in message
    assert content.strip().splitlines()[-1] in message


def test_malformed_csv_lines(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("user,item,rating\n1,2,5\n1,3\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3.*'1,3'"):
        load_ratings(path)
    path.write_text("user,item,rating\n1,2,great\n")
    with pytest.raises(DataError, match=r"bad.csv: line 2: the rating is not a number"):
        load_ratings(path)
    path.write_text("who,what\n1,2\n")
    with pytest.raises(DataError, match=r"bad.csv: line 1: expected a header"):
        load_ratings(path)


def test_missing_empty_and_all_negative_files(tmp_path):
    with pytest.raises(DataError, match="ratings.dat: file not found"):
        load_ratings(tmp_path / "ratings.dat")
    empty = tmp_path / "empty.dat"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.dat: the file is empty"):
        load_ratings(empty)
    negative = tmp_path / "low.dat"
    negative.write_text("1::2::1::5\n")
    with pytest.raises(DataError, match="low.dat: no interaction with rating >= 4"):
        load_ratings(negative)
    too_short = tmp_path / "short.dat"
    too_short.write_text("1::2::5::5\n1::3::5::6\n")
    with pytest.raises(DataError, match="short.dat: no user has enough"):
        load_ratings(too_short)


def test_malformed_movies_file(tmp_path):
    path = _write_movielens(tmp_path / "ml")
    (tmp_path / "ml" / "movies.dat").write_text("100::Title only\n")
    with pytest.raises(DataError, match=r"movies.dat: line 1"):
        load_ratings(path)
