"""Loaders: MovieLens layouts, CSV/Parquet catalogues and event logs, bad files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedtower.data.loaders import (
    build_content_features,
    load_catalogue,
    load_dataset,
    load_event_log,
    load_movielens,
    movielens_layout,
)
from fedtower.data.schema import Catalogue
from fedtower.data.validation import DataValidationError

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML_LATEST_SMALL = SHARED_DATA / "ml-latest-small"


def shop_catalogue() -> Catalogue:
    items = pd.DataFrame(
        {
            "item": ["a", "b", "c"],
            "title": ["", "", ""],
            "categories": [(), (), ()],
            "price": [np.nan] * 3,
            "brand": ["", "", ""],
        }
    )
    return Catalogue(items)


# ---------------------------------------------------------------- MovieLens layouts


def test_ml100k_fixture():
    # Prepare
    folder = FIXTURES / "ml-100k"

    # Execute
    dataset, report = load_movielens(folder)

    # Assert
    events, catalogue = dataset.events, dataset.catalogue
    assert (movielens_layout(folder), dataset.name) == ("ml-100k", "ml-100k")
    assert events["user"].tolist() == ["1", "1", "2", "2", "3"]
    assert events["item"].tolist() == ["1", "2", "1", "3", "4"]
    assert events["value"].tolist() == [5.0, 3.0, 4.0, 1.0, 2.0]
    assert events["timestamp"].tolist()[0] == 874_965_758
    assert set(events["behaviour"]) == {"rating"}
    assert catalogue.items["title"].tolist()[2] == "Café Society (1994)"  # Latin-1 decoded
    assert catalogue.items["categories"].tolist() == [
        ("Animation", "Children's", "Comedy"),
        ("Action", "Adventure", "Thriller"),
        ("Comedy",),
        (),  # the "unknown" genre flag is no genre
    ]
    assert catalogue.feature_names == [
        "category:Action", "category:Adventure", "category:Animation", "category:Children's",
        "category:Comedy", "category:Thriller", "release_year", "release_year_missing",
    ]  # fmt: skip
    # Years 1995, 1995, 1994: mean 1994.667, std sqrt(2)/3, so z = +1/sqrt(2), -sqrt(2).
    years = catalogue.features[:, -2:]
    np.testing.assert_allclose(
        years, [[2**-0.5, 0], [2**-0.5, 0], [-(2**0.5), 0], [0, 1]], rtol=1e-5
    )
    assert catalogue.features.dtype == np.float32
    assert report.rows_skipped == 0


def test_ml1m_fixture():
    # Prepare
    folder = FIXTURES / "ml-1m"

    # Execute
    dataset, _ = load_movielens(folder)

    # Assert
    items = dataset.catalogue.items
    assert items["title"].tolist()[2] == "Misérables, Les (1995)"
    assert items["categories"].tolist()[2] == ("Drama", "Musical")
    assert dataset.events[["user", "item"]].values.tolist() == [["1", "1"], ["1", "3"], ["2", "2"]]
    assert dataset.events["value"].tolist() == [5.0, 4.0, 3.0]
    # Every film is from 1995, so the standardised year is 0 and no year is missing.
    assert dataset.catalogue.feature_names[-1] == "release_year"
    assert dataset.catalogue.features[:, -1].tolist() == [0.0, 0.0, 0.0]


def test_ml_latest_fixture():
    # Prepare
    folder = FIXTURES / "ml-latest"

    # Execute
    dataset, _ = load_movielens(folder)

    # Assert
    items, features = dataset.catalogue.items, dataset.catalogue.features
    assert items["title"].tolist()[1] == "American President, The (1995)"
    assert items["categories"].tolist()[2] == ()  # "(no genres listed)"
    assert np.isnan(items["price"]).all() and set(items["brand"]) == {""}
    assert dataset.events["value"].tolist() == [4.0, 0.5, 5.0, 3.5]
    # "Black Mirror": no genre, no year -> zeros and the missing-year flag.
    assert features[2].tolist() == [0.0] * 8 + [1.0]


@pytest.mark.shared_data
def test_real_ml_latest_small():
    # Prepare
    if not ML_LATEST_SMALL.is_dir():
        pytest.skip(f"MovieLens ml-latest-small is not at {ML_LATEST_SMALL}.")

    # Execute
    started = time.perf_counter()
    dataset, report = load_movielens(ML_LATEST_SMALL)
    seconds = time.perf_counter() - started

    # Assert
    events, catalogue = dataset.events, dataset.catalogue
    assert events["user"].nunique() == 610
    assert len(events) == 100_836
    assert events["item"].nunique() == 9_724
    assert len(catalogue) == 9_742
    # 20 genre labels in movies.csv, one of them the "(no genres listed)"
    # placeholder, which becomes an empty tuple: 19 genre columns.
    genre_columns = [n for n in catalogue.feature_names if n.startswith("category:")]
    assert len(genre_columns) == 19
    assert catalogue.feature_names[19:] == ["release_year", "release_year_missing"]
    assert report.rows_skipped == 0
    assert seconds < 5.0


def test_movielens_bad_rating_names_the_source_column(tmp_path):
    # Prepare: a copy of the ml-latest fixture with a rating of 7 on line 3.
    folder = tmp_path / "ml-latest"
    shutil.copytree(FIXTURES / "ml-latest", folder)
    ratings = folder / "ratings.csv"
    lines = ratings.read_text().splitlines()
    lines[2] = "1,2,7,964981247"
    ratings.write_text("\n".join(lines) + "\n")

    # Execute
    with pytest.raises(DataValidationError) as caught:
        load_movielens(folder)
    dataset, report = load_movielens(folder, on_error="skip")

    # Assert
    assert str(caught.value) == f"{ratings}:3: field 'rating': rating 7 is outside 0.5-5."
    assert len(dataset.events) == 3 and report.rows_skipped == 1


def test_folder_without_a_movielens_layout_says_what_it_looked_for(tmp_path):
    # Prepare
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")

    # Execute
    with pytest.raises(FileNotFoundError) as caught:
        load_movielens(tmp_path)

    # Assert
    message = str(caught.value)
    assert "ratings.csv + movies.csv (ml-latest)" in message
    assert "ratings.dat + movies.dat (ml-1m)" in message
    assert "u.data + u.item (ml-100k)" in message
    assert "found ratings.csv but not movies.csv" in message


# ---------------------------------------------------------------- event logs


def test_csv_event_log_with_column_mapping_and_default_behaviour(tmp_path):
    # Prepare
    log = tmp_path / "orders.csv"
    log.write_text("customer,product,when\nc1,a,2021-03-04T05:06:07Z\nc2,b,1614834367\n")

    # Execute
    events, report = load_event_log(
        log,
        catalogue=shop_catalogue(),
        columns={"user": "customer", "item": "product", "timestamp": "when"},
        default_behaviour="purchase",
    )

    # Assert
    assert events[["user", "item", "behaviour"]].values.tolist() == [
        ["c1", "a", "purchase"],
        ["c2", "b", "purchase"],
    ]
    assert events["timestamp"].tolist() == [1_614_834_367, 1_614_834_367]
    assert events["value"].isna().all()
    assert report.sources == [str(log)]


def test_parquet_event_log_with_typed_columns(tmp_path):
    # Prepare: integer users, dictionary-encoded items, a tz-aware timestamp
    # column, a float value column with NaN (absent) and inf (bad) on row 3.
    log = tmp_path / "events.parquet"
    when = pd.to_datetime(
        ["2020-01-01T00:00:00Z", "2020-01-02T00:00:01.5Z", "2020-01-03T00:00:00Z"],
        format="ISO8601",
    )
    table = pa.table(
        {
            "uid": pa.array([7, 8, 9]),
            "sku": pa.array(["a", "b", "c"]).dictionary_encode(),
            "kind": ["view", "rating", "view"],
            "at": pa.array(when),
            "score": [np.nan, 4.5, np.inf],
        }
    )
    pq.write_table(table, log)
    mapping = {
        "user": "uid",
        "item": "sku",
        "behaviour": "kind",
        "timestamp": "at",
        "value": "score",
    }

    # Execute
    events, report = load_event_log(
        log, catalogue=shop_catalogue(), columns=mapping, on_error="skip"
    )

    # Assert
    assert events["user"].tolist() == ["7", "8"]
    assert events["item"].tolist() == ["a", "b"]
    assert events["timestamp"].tolist() == [1_577_836_800, 1_577_923_201]
    assert np.isnan(events["value"].iloc[0]) and events["value"].iloc[1] == 4.5
    assert [str(issue) for issue in report.issues] == [
        f"{log}: row 3: field 'score': not a finite number ('inf')"
    ]


def test_folder_of_event_files_keeps_per_file_lines(tmp_path):
    # Prepare: files are read in name order; c.csv repeats a.csv's event and
    # has an unknown item on its line 3. The README is not an event file.
    folder = tmp_path / "events"
    folder.mkdir()
    header = "user,item,behaviour,timestamp\n"
    (folder / "c.csv").write_text(header + "u1,a,view,10\nu3,zz,view,30\n")
    (folder / "a.csv").write_text(header + "u1,a,view,10\n")
    pq.write_table(
        pa.table({"user": ["u2"], "item": ["b"], "behaviour": ["click"], "timestamp": [20]}),
        folder / "b.parquet",
    )
    (folder / "README.txt").write_text("not events")

    # Execute
    events, report = load_event_log(folder, catalogue=shop_catalogue(), on_error="skip")

    # Assert
    assert events["user"].tolist() == ["u1", "u2"]
    assert report.sources == [str(folder / n) for n in ("a.csv", "b.parquet", "c.csv")]
    assert [str(issue) for issue in report.issues] == [
        (
            f"{folder / 'c.csv'}:2: field 'event': duplicate of the event at "
            f"{folder / 'a.csv'}:2 (same user, item, behaviour and timestamp)"
        ),
        f"{folder / 'c.csv'}:3: field 'item': item 'zz' is not in the catalogue",
    ]


def test_csv_line_numbers_survive_blank_lines_long_rows_and_multiline_fields(tmp_path):
    # Prepare: line 3 empty, line 4 only spaces, line 5 has an extra field,
    # lines 7-8 hold one record with a quoted line break, line 9 has an unknown item.
    log = tmp_path / "e.csv"
    log.write_text(
        "user,item,behaviour,timestamp\n"
        "u1,a,view,10\n"
        "\n"
        "   \n"
        "u2,a,view,11,extra\n"
        "u3,b,view,12\n"
        '"u\n4",c,view,13\n'
        "u5,zz,view,14\n"
    )

    # Execute
    events, report = load_event_log(log, catalogue=shop_catalogue(), on_error="skip")
    with pytest.raises(DataValidationError) as caught:
        load_event_log(log, catalogue=shop_catalogue())

    # Assert
    assert events["user"].tolist() == ["u1", "u3", "u\n4"]
    assert [(i.line, i.reason) for i in report.issues] == [
        (5, "malformed_row"),
        (9, "unknown_item"),
    ]
    assert (report.rows_read, report.rows_skipped) == (5, 2)
    assert str(caught.value) == f"{log}:5: expected 4 fields, saw 5."


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("e.csv", b"", ": is empty.", id="empty"),
        pytest.param("e.csv", b" \n\n", ": is empty.", id="blank"),
        pytest.param("e.csv", b"user,item\x00\x01\x02", ": holds NUL bytes", id="binary"),
        pytest.param(
            "e.csv", b"user,item,behaviour,timestamp\nu\xff,a,view,1\n",
            ":2: byte 0xff cannot be decoded as UTF-8 text", id="not-utf8",
        ),
        pytest.param(
            "e.csv", b'user,item,behaviour,timestamp\n"u1,a,view,1\n',
            ": is not a readable delimited text file", id="open-quote",
        ),
        pytest.param(
            "e.parquet", b"PAR1 this is not parquet", ": is not a readable Parquet file",
            id="garbage-parquet",
        ),
        pytest.param("e.json", b"{}", ": has an unsupported extension ('.json')", id="extension"),
    ],
)  # fmt: skip
def test_unusable_files_are_named_in_a_clear_error(tmp_path, name, content, expected):
    # Prepare
    path = tmp_path / name
    path.write_bytes(content)

    # Execute
    with pytest.raises(DataValidationError) as caught:
        load_event_log(path, catalogue=shop_catalogue())

    # Assert
    assert str(caught.value).startswith(f"{path}{expected}")


def test_missing_file_and_empty_folder_are_not_found(tmp_path):
    # Prepare
    missing = tmp_path / "nope.csv"
    empty_folder = tmp_path / "logs"
    empty_folder.mkdir()

    # Execute / Assert
    with pytest.raises(FileNotFoundError, match=f"The event log '{missing}' does not exist."):
        load_event_log(missing, catalogue=shop_catalogue())
    with pytest.raises(FileNotFoundError, match="holds no .csv or .parquet files"):
        load_event_log(empty_folder, catalogue=shop_catalogue())


def test_csv_without_matching_header_names_the_column(tmp_path):
    # Prepare: the header row is missing, so the first event is taken as one.
    log = tmp_path / "e.csv"
    log.write_text("1,31,2.5,1260759144\n")

    # Execute
    with pytest.raises(DataValidationError) as caught:
        load_event_log(log, catalogue=shop_catalogue(), default_behaviour="rating")

    # Assert
    assert str(caught.value).startswith(f"{log}:1: field 'user': required column 'user' is missing")
    assert "does the file lack a header row?" in str(caught.value)


def test_mapped_column_that_is_absent_names_both_names(tmp_path):
    # Prepare
    log = tmp_path / "e.csv"
    log.write_text("user,item,behaviour,timestamp\nu,a,view,1\n")

    # Execute
    with pytest.raises(DataValidationError) as caught:
        load_event_log(log, catalogue=shop_catalogue(), columns={"timestamp": "ts"})

    # Assert
    assert "required column 'ts' (for 'timestamp') is missing" in str(caught.value)


def test_bad_arguments_are_refused(tmp_path):
    # Prepare
    log = tmp_path / "e.csv"
    log.write_text("user,item,behaviour,timestamp\nu,a,view,1\n")

    # Execute / Assert
    with pytest.raises(ValueError, match="unknown fields \\['customer'\\]"):
        load_event_log(log, catalogue=shop_catalogue(), columns={"customer": "user"})
    with pytest.raises(ValueError, match="'like' is not a behaviour"):
        load_event_log(log, catalogue=shop_catalogue(), default_behaviour="like")


# ---------------------------------------------------------------- catalogues


def test_csv_catalogue_with_mapping_and_dense_features(tmp_path):
    # Prepare
    path = tmp_path / "products.csv"
    path.write_text(
        "sku,name,cats,cost,maker,emb0\n"
        "A,Kettle,kitchen|home,19,Acme,0.25\n"
        "B,Toaster,kitchen,99,Acme,-1\n"
        "C,Lamp,,,Lumo,2\n"
    )
    mapping = {
        "item": "sku",
        "title": "name",
        "categories": "cats",
        "price": "cost",
        "brand": "maker",
    }

    # Execute
    catalogue = load_catalogue(path, columns=mapping, feature_columns=["emb0"])

    # Assert
    assert catalogue.index.ids == ["A", "B", "C"]
    assert catalogue.items["categories"].tolist() == [("kitchen", "home"), ("kitchen",), ()]
    assert catalogue.feature_names == [
        "category:home", "category:kitchen", "log_price", "log_price_missing",
        "brand:Acme", "brand:Lumo", "emb0",
    ]  # fmt: skip
    # log1p(19) = ln 20 and log1p(99) = ln 100: two known values standardise to -1 and +1.
    np.testing.assert_allclose(
        catalogue.features,
        [[1, 1, -1, 0, 1, 0, 0.25], [0, 1, 1, 0, 1, 0, -1], [0, 0, 0, 1, 0, 1, 2]],
        rtol=1e-6,
    )


def test_catalogue_problems_are_listed_by_line(tmp_path):
    # Prepare: line 3 blank; then a negative price, a repeated id, a missing id
    # and a price that is not a number.
    path = tmp_path / "catalogue.csv"
    path.write_text("item,price\nA,1\n\nB,-2\nA,3\n,4\nC,abc\n")

    # Execute
    with pytest.raises(DataValidationError) as caught:
        load_catalogue(path)

    # Assert
    assert [str(issue) for issue in caught.value.issues] == [
        f"{path}:4: field 'price': -2 is below the minimum 0",
        f"{path}:5: field 'item': duplicate item id 'A' (first listed at line 2)",
        f"{path}:6: field 'item': missing item id",
        f"{path}:7: field 'price': not a finite number ('abc')",
    ]


def test_parquet_catalogue_with_list_categories(tmp_path):
    # Prepare
    path = tmp_path / "catalogue.parquet"
    pq.write_table(
        pa.table({"item": [10, 11], "categories": [["b", "a"], []], "price": [1.0, None]}), path
    )

    # Execute
    catalogue = load_catalogue(path)

    # Assert
    assert catalogue.index.ids == ["10", "11"]
    assert catalogue.items["categories"].tolist() == [("b", "a"), ()]
    assert catalogue.feature_names == ["category:a", "category:b", "log_price", "log_price_missing"]
    assert catalogue.features.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1]]


def test_catalogue_without_items_is_an_error(tmp_path):
    # Prepare
    path = tmp_path / "catalogue.csv"
    path.write_text("item,title\n")

    # Execute / Assert
    with pytest.raises(DataValidationError, match="holds no items"):
        load_catalogue(path)


# ---------------------------------------------------------------- content features


def test_content_features_keep_the_most_common_brands_and_ignore_row_order():
    # Prepare: y and z appear twice (tie broken by name), x and w once.
    items = pd.DataFrame(
        {
            "item": list("1234567"),
            "title": [""] * 7,
            "categories": [()] * 7,
            "price": [np.nan] * 7,
            "brand": ["x", "y", "y", "z", "z", "w", ""],
        }
    )

    # Execute
    features, names = build_content_features(items, max_brands=2)
    reversed_features, reversed_names = build_content_features(items.iloc[::-1], max_brands=2)

    # Assert
    assert names == ["brand:y", "brand:z"] == reversed_names
    assert features.tolist() == [[0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]]
    assert reversed_features.tolist() == features[::-1].tolist()


def test_release_year_is_used_only_when_titles_carry_years():
    # Prepare: one title in three has a year, so by default it is left out.
    items = pd.DataFrame(
        {
            "item": ["1", "2", "3"],
            "title": ["Kettle", "Lamp (2001)", "Toaster"],
            "categories": [("a",), (), ()],
            "price": [np.nan] * 3,
            "brand": [""] * 3,
        }
    )

    # Execute
    _, default_names = build_content_features(items)
    forced, forced_names = build_content_features(items, release_year=True)

    # Assert
    assert default_names == ["category:a"]
    assert forced_names == ["category:a", "release_year", "release_year_missing"]
    assert forced[:, 1:].tolist() == [[0, 1], [0, 0], [0, 1]]


# ---------------------------------------------------------------- datasets


def test_load_dataset_reads_a_catalogue_and_an_events_folder(tmp_path):
    # Prepare
    (tmp_path / "catalogue.csv").write_text("item,title,categories\na,A,x|y\nb,B,y\n")
    (tmp_path / "events").mkdir()
    header = "user,item,behaviour,timestamp,value\n"
    (tmp_path / "events" / "day1.csv").write_text(header + "u1,a,dwell,100,12.5\n")
    (tmp_path / "events" / "day2.csv").write_text(header + "u1,b,cart,200,\n")

    # Execute
    dataset, report = load_dataset(tmp_path)

    # Assert
    assert dataset.name == tmp_path.name
    assert dataset.events["behaviour"].tolist() == ["dwell", "cart"]
    assert dataset.events["value"].tolist()[0] == 12.5
    assert dataset.catalogue.feature_names == ["category:x", "category:y"]
    assert report.rows_kept == 2


def test_load_dataset_recognises_movielens():
    # Prepare
    folder = FIXTURES / "ml-1m"

    # Execute
    dataset, _ = load_dataset(folder)

    # Assert
    assert dataset.name == "ml-1m" and len(dataset.events) == 3


def test_load_dataset_refuses_unknown_or_ambiguous_folders(tmp_path):
    # Prepare
    (tmp_path / "catalogue.csv").write_text("item\na\n")
    (tmp_path / "events.csv").write_text("user,item,behaviour,timestamp\nu,a,view,1\n")
    (tmp_path / "events").mkdir()
    unknown = tmp_path / "other"
    unknown.mkdir()

    # Execute / Assert
    with pytest.raises(DataValidationError, match="keep only one of them"):
        load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a MovieLens folder nor"):
        load_dataset(unknown)


def test_movielens_user_ids_must_be_positive_whole_numbers(tmp_path):
    # Prepare: the ml-latest fixture with -5, 1.5 and a 12-digit user id on lines 2 to 4.
    folder = tmp_path / "ml-latest"
    shutil.copytree(FIXTURES / "ml-latest", folder)
    ratings = folder / "ratings.csv"
    lines = ratings.read_text().splitlines()
    for line, user in zip((1, 2, 3), ("-5", "1.5", "9" * 12), strict=True):
        lines[line] = ",".join([user, *lines[line].split(",")[1:]])
    ratings.write_text("\n".join(lines) + "\n")

    # Execute
    dataset, report = load_movielens(folder, on_error="skip")

    # Assert: each is skipped and reported by line and source column, the rest kept.
    assert report.counts_by_reason() == {"bad_id": 3}
    assert [(issue.line, issue.field) for issue in report.issues] == [(2, "userId"), (3, "userId"), (4, "userId")]
    assert "positive whole numbers" in report.issues[0].message and "'-5'" in report.issues[0].message
    assert len(dataset.events) == len(lines) - 1 - 3


def test_an_id_longer_than_the_http_apis_limit_is_refused_by_the_loader_too(tmp_path):
    # Prepare: the same 257-character limit as POST /recommend's `user` (fedtower.data.ids).
    from fedtower.data.ids import MAX_ID_LENGTH

    log = tmp_path / "e.csv"
    log.write_text("user,item,behaviour,timestamp\n" + "u" * (MAX_ID_LENGTH + 1) + ",a,view,10\n"
                   + "u" * MAX_ID_LENGTH + ",b,view,11\n")  # fmt: skip

    # Execute
    events, report = load_event_log(log, catalogue=shop_catalogue(), on_error="skip")

    # Assert: 257 is refused with the limit named, 256 kept.
    assert [len(user) for user in events["user"]] == [MAX_ID_LENGTH]
    assert report.issues[0].line == 2 and f"at most {MAX_ID_LENGTH}" in report.issues[0].message
