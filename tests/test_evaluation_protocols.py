"""Evaluation protocols: temporal, leave-one-out with NCF negatives, none, and splits given as files."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fedtower.central import build_model, popularity_sampled, run_central
from fedtower.client.local import load_node_data
from fedtower.client.state import ClientStateStore
from fedtower.config import RunSettings
from fedtower.data.given import load_given_split
from fedtower.data.loaders import load_event_log
from fedtower.data.prepared import prepare_split
from fedtower.data.protocols import SplitSpec
from fedtower.data.sources import resolve_dataset
from fedtower.data.splits import leave_one_out
from fedtower.data.validation import DataValidationError
from fedtower.metrics import SampledSums, sampled_hit_and_ndcg
from fedtower.models.training import TrainConfig, evaluate_sampled, train
from fedtower.privacy.accounting import ClientAccountant
from tests.test_privacy_findings import DATA, deployed, evaluate, new_state, run_config
from tests.test_privacy_findings import train as train_round
from tests.test_splits import make_interactions

ROOT = Path(__file__).resolve().parents[1]

# Ten catalogue rows; only rows 0..5 occur in the interaction data (rows 6..9: items no one interacted with).
# a saw 0, 1, 2 (2 latest), b saw 2, 3 (3 latest), c saw 4, 5 (5 latest).
NCF = make_interactions([("a", 0, 1), ("a", 1, 2), ("a", 2, 3), ("b", 2, 1), ("b", 3, 2), ("c", 4, 1), ("c", 5, 2)])


# ------------------------------------------------------------------ leave-one-out negatives


def test_ncf_negatives_are_items_in_the_interaction_data_the_user_never_interacted_with():
    # Prepare: by hand, a never interacted with {3, 4, 5} among the interacted items {0..5}.
    # Execute
    split = leave_one_out(NCF, num_negatives=3, seed=0, num_items=10)
    # Assert: a's three negatives are exactly that set; nobody gets a row no one interacted with.
    negatives = dict(zip(split.test_items.index, map(set, split.negatives.tolist())))
    assert split.pool == "interacted"
    assert negatives["a"] == {3, 4, 5}
    assert negatives["b"] <= {0, 1, 4, 5} and negatives["c"] <= {0, 1, 2, 3}
    assert split.negatives.max() <= 5


def test_catalogue_negatives_include_items_no_one_interacted_with():
    # a never interacted with 7 catalogue rows: {3, ..., 9}; asking for 7 must return exactly them.
    split = leave_one_out(NCF, num_negatives=7, seed=0, num_items=10, pool="catalogue")
    assert set(split.negatives[0].tolist()) == {3, 4, 5, 6, 7, 8, 9}
    with pytest.raises(ValueError, match="fewer than 4 items in the interaction data"):
        leave_one_out(NCF, num_negatives=4, seed=0, num_items=10)  # a has only 3 in the NCF pool


def test_ncf_negatives_on_a_large_catalogue_avoid_the_never_interacted_tail():
    # Prepare: 2,000 catalogue rows, of which only the first 300 occur; 200 users.
    rng = np.random.default_rng(3)
    rows = [(f"u{u}", int(i), t) for u in range(200) for t, i in enumerate(rng.choice(300, 12, replace=False))]
    interactions = make_interactions(rows)
    # Execute
    ncf = leave_one_out(interactions, num_negatives=99, seed=1, num_items=2000)
    wide = leave_one_out(interactions, num_negatives=99, seed=1, num_items=2000, pool="catalogue")
    # Assert: the NCF pool never leaves the interacted items; the catalogue pool mostly does (85% of rows).
    assert ncf.negatives.max() < 300
    assert (wide.negatives >= 300).mean() > 0.8
    seen = set(zip(interactions["user"], interactions["item"]))
    users = np.repeat(ncf.test_items.index.to_numpy(), 99)
    assert not any((u, i) in seen for u, i in zip(users, ncf.negatives.ravel().tolist()))


def test_split_spec_validates_and_describes_its_protocol():
    assert "NCF protocol" in SplitSpec("leave-one-out").describe()
    assert "latest 10%" in SplitSpec(test_fraction=0.1).describe()
    assert "catalogue items" in SplitSpec("leave-one-out", negative_pool="catalogue").describe()
    for bad, message in ((dict(kind="random"), "split must be one of"), (dict(test_fraction=1.0), "between 0 and 1"),
                         (dict(num_negatives=-1), "0 or more"), (dict(negative_pool="all"), "negative pool")):
        with pytest.raises(ValueError, match=message):
            SplitSpec(**bad)


# ------------------------------------------------------------------ prepared splits


def test_prepare_split_by_kind():
    dataset, _ = resolve_dataset("synthetic:users=60,items=80,seed=1")
    temporal = prepare_split(dataset)
    loo = prepare_split(dataset, spec=SplitSpec("leave-one-out", num_negatives=10))
    none = prepare_split(dataset, spec=SplitSpec("none"))
    total = temporal.train.items.size + temporal.test.items.size
    # leave-one-out: one held-out item per user (all users here have 2+), each with its 10 negatives.
    assert set(loo.test.lengths().tolist()) == {1}
    assert loo.train.items.size == total - len(loo.users)
    assert loo.sampled.negatives.shape == (len(loo.users), 10)
    np.testing.assert_array_equal(loo.sampled.positives, loo.test.items[loo.test.indptr[loo.sampled.user_rows]])
    # none: everything trains, nothing is held out, and the split says so.
    assert none.train.items.size == total and none.test.items.size == 0
    assert not none.evaluable and temporal.evaluable and loo.evaluable
    assert temporal.sampled is None and "temporal" in temporal.protocol


def test_a_subset_keeps_each_users_negatives_with_it():
    dataset, _ = resolve_dataset("synthetic:users=60,items=80,seed=1")
    whole = prepare_split(dataset, spec=SplitSpec("leave-one-out", num_negatives=5))
    users = [whole.users[7], whole.users[2]]
    part = whole.subset(users)
    assert part.users == sorted(users)
    for new_row, user in enumerate(part.users):
        old = whole.users.index(user)
        np.testing.assert_array_equal(part.sampled.negatives[new_row], whole.sampled.negatives[old])
        assert part.sampled.user_rows[new_row] == new_row
        assert part.sampled.positives[new_row] == whole.sampled.positives[old]


# ------------------------------------------------------------------ given files


def write(path, text):
    path.write_text(text)
    return path


def test_a_given_split_is_validated_and_every_bad_row_reported(tmp_path):
    # Prepare: implicit rows without behaviour or timestamps; the test file lists negatives three ways.
    train = write(tmp_path / "train.csv", "user,item\n1,10\n1,11\n1,12\n2,11\n2,13\n3,10\n3,14\n")
    test = write(tmp_path / "test.csv", 'user,item,negatives\n1,13,14 15\n2,14,"10,12"\n3,11,99|12\n'
                 "4,10,11 12\n3,12,12 13\n2,10,13 13\n1,14,77 10\n3,13,10 11 12\n")
    # Execute
    given = load_given_split(train, test, order="file")
    # Assert: four good rows; every other row named with its line and why.
    issues = {issue.line: (issue.field, issue.reason) for issue in given.report.issues}
    assert issues == {5: ("user", "user_not_in_train"), 6: ("negatives", "negative_is_positive"),
                      7: ("negatives", "repeated_negative"), 9: ("negatives", "negative_count")}
    assert given.report.rows_read == 7 + 8 and given.report.rows_kept == 7 + 4
    ids = given.catalogue.index.ids
    assert ids == ["10", "11", "12", "13", "14", "15", "77", "99"]  # numeric ids in numeric order
    assert [ids[i] for i in given.test["item"]] == ["13", "14", "11", "14"]
    assert [[ids[i] for i in row] for row in given.negatives] == [["14", "15"], ["10", "12"], ["99", "12"],
                                                                  ["77", "10"]]
    # Train first, test after it, each in file order.
    assert given.train_events["timestamp"].tolist() == list(range(7))
    assert given.test["timestamp"].tolist() == [7, 8, 9, 13]
    assert "1 test rows name an item their user also has in train" not in " ".join(given.notes)


def test_a_given_split_prepares_histories_and_sampled_rows(tmp_path):
    train = write(tmp_path / "train.csv", "user,item\n1,10\n1,11\n2,11\n2,12\n")
    test = write(tmp_path / "test.csv", "user,item,negatives\n1,12,13\n2,13,10\n2,10,13\n")
    split = load_given_split(train, test, order="file").prepare()
    assert split.users == ["1", "2"] and split.kind == "given"
    assert [h.tolist() for h in split.train.as_lists()] == [[0, 1], [1, 2]]
    assert [h.tolist() for h in split.test.as_lists()] == [[2], [3, 0]]
    assert split.sampled.user_rows.tolist() == [0, 1, 1]
    assert split.sampled.negatives.tolist() == [[3], [0], [3]]


def test_a_given_parquet_test_file_may_hold_negatives_as_a_list_column(tmp_path):
    train = write(tmp_path / "train.csv", "user,item\n1,10\n1,11\n2,11\n")
    test = tmp_path / "test.parquet"
    pq.write_table(pa.table({"user": ["1", "2"], "item": ["12", "10"],
                             "negatives": pa.array([["13", "14"], ["12", "13"]])}), test)  # fmt: skip
    given = load_given_split(train, test, order="file")
    ids = given.catalogue.index.ids
    assert [[ids[i] for i in row] for row in given.negatives] == [["13", "14"], ["12", "13"]]


def test_a_given_split_against_a_catalogue_reports_unknown_items(tmp_path):
    dataset, _ = resolve_dataset("synthetic:users=20,items=30,seed=1")
    train = write(tmp_path / "train.csv", "user,item\nx,i00001\nx,i00002\ny,nope\n")
    test = write(tmp_path / "test.csv", "user,item,negatives\nx,i00003,i00004 zzz\n")
    given = load_given_split(train, test, catalogue=dataset.catalogue, order="file")
    reasons = {(issue.file.rsplit("/", 1)[-1], issue.line): issue.reason for issue in given.report.issues}
    assert reasons == {("train.csv", 4): "unknown_item", ("test.csv", 2): "unknown_negative"}


def test_data_without_timestamps_needs_order_file_and_says_so(tmp_path):
    dataset, _ = resolve_dataset("synthetic:users=20,items=30,seed=1")
    log = write(tmp_path / "events.csv", "user,item,behaviour\nx,i00003,click\nx,i00001,click\n")
    with pytest.raises(DataValidationError, match="use order \"file\""):
        load_event_log(log, catalogue=dataset.catalogue)
    events, _ = load_event_log(log, catalogue=dataset.catalogue, order="file", first_position=100)
    assert events["timestamp"].tolist() == [100, 101]
    # The file's order, not the item id, decides which event is the latest.
    events["value"] = np.nan
    split = prepare_split(type(dataset)(dataset.catalogue, events), spec=SplitSpec("leave-one-out", num_negatives=0))
    assert dataset.catalogue.index.ids[int(split.test.items[0])] == "i00001"


# ------------------------------------------------------------------ sampled metrics


def test_sampled_sums_by_hand():
    # Positive 0.5 vs negatives: [0.1, 0.2] -> rank 1; [0.9, 0.5] -> rank 3 (ties count against the positive).
    sums = SampledSums.of([0.5, 0.5], [[0.1, 0.2], [0.9, 0.5]], k=2)
    assert (sums.rows, sums.hits, sums.ndcg) == (2, 1.0, 1.0)
    merged = sums + SampledSums.of([1.0], [[0.0, 2.0]], k=2)  # rank 2: ndcg 1/log2(3)
    final = merged.finalize()
    assert final["sampled-hr@2"] == pytest.approx(2 / 3)
    assert final["sampled-ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert SampledSums.from_metrics(merged.to_metrics()) == merged
    assert SampledSums.from_metrics({"k": 20}) is None
    with pytest.raises(ValueError, match="out of range"):
        SampledSums.from_metrics({**merged.to_metrics(), "sampled-hits": 5.0})
    with pytest.raises(ValueError, match="negatives 2 and 3"):
        sums + SampledSums.of([0.5], [[0.1, 0.2, 0.3]], k=2)


def test_evaluate_sampled_matches_scoring_each_row_by_hand():
    dataset, _ = resolve_dataset("synthetic:users=40,items=60,seed=5")
    split = prepare_split(dataset, spec=SplitSpec("leave-one-out", num_negatives=9))
    torch.manual_seed(0)
    model = build_model(dataset, split, dim=8)
    train(model, split.train, TrainConfig(epochs=2))
    sums = evaluate_sampled(model, split.train, split.sampled, k=3, chunk=7)
    # The slow reference: one user at a time, through the model's own scoring of the whole catalogue.
    hits = ndcgs = 0.0
    vectors, bias = model.item_table()
    for row, user in enumerate(split.sampled.user_rows):
        history = torch.as_tensor(split.train.items_of(user)[-200:]).unsqueeze(0)
        vector = model.user_vectors(torch.as_tensor([user]), history, vectors)[0]
        scores = (vectors @ vector + bias).detach().numpy()
        hit, ndcg = sampled_hit_and_ndcg(scores[split.sampled.positives[row]], scores[split.sampled.negatives[row]], 3)
        hits, ndcgs = hits + hit, ndcgs + ndcg
    assert sums.rows == len(split.users) and sums.negatives == 9
    assert sums.hits == hits and sums.ndcg == pytest.approx(ndcgs, rel=1e-5)


def test_central_run_scores_one_model_both_ways_on_a_given_split(tmp_path):
    # Prepare: a published-style split of synthetic data, with 20 negatives per test row.
    dataset, _ = resolve_dataset("synthetic:users=80,items=100,seed=3")
    split = prepare_split(dataset, spec=SplitSpec("leave-one-out", num_negatives=20, seed=4))
    ids = np.array(dataset.catalogue.index.ids)
    rows = [(user, ids[item]) for u, user in enumerate(split.users) for item in split.train.items_of(u)]
    pd.DataFrame(rows, columns=["user", "item"]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"user": np.array(split.users)[split.sampled.user_rows], "item": ids[split.sampled.positives],
                  "negatives": [" ".join(ids[n]) for n in split.sampled.negatives]}).to_csv(tmp_path / "test.csv",
                                                                                           index=False)  # fmt: skip
    given = load_given_split(tmp_path / "train.csv", tmp_path / "test.csv", catalogue=dataset.catalogue, order="file")
    # Execute
    result = run_central(given.dataset, split=given.prepare(), model_settings={"dim": 8},
                         train_config=TrainConfig(epochs=3))  # fmt: skip
    # Assert: full ranking and the file's own negatives, from one model, and popularity under the same negatives.
    assert result["protocol"].startswith("given")
    assert result["sampled"]["sampled-rows"] == 80 and result["sampled"]["sampled-negatives"] == 20
    assert result["metrics"]["users"] == 80
    assert result["sampled"]["sampled-hr@10"] > result["popularity_sampled"]["sampled-hr@10"] - 0.2
    expected = popularity_sampled(given.prepare()).finalize()["sampled-hr@10"]
    assert result["popularity_sampled"]["sampled-hr@10"] == expected
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_central(dataset, split=SplitSpec("none"), train_config=TrainConfig(epochs=1))


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_central_loo_trains_one_model_and_reports_the_protocol(capsys):
    argv = ["--data", "synthetic:users=60,items=80,seed=1", "--loo", "--negatives", "20", "--epochs", "2", "--dim", "8",
            "--sampled-k", "5"]
    out = benchmark("quality_central").main(argv)
    progress = capsys.readouterr().err
    assert progress.count("epoch   1 ") == 1 and progress.count("epoch   2 ") == 1  # one training, not two
    assert "NCF protocol" in out["protocol"] and "NCF protocol" in out["negatives_from"]
    assert 0 < out["sampled-hr@5"] <= 1 and 0 < out["ndcg@20"] <= 1 and "sampled-hr@10" not in out
    assert out["test_interactions"] == out["users"] == out["sampled_rows"] == 60


# ------------------------------------------------------------------ federated evaluation, as the adversary sees it

NOTHING_MEASURED = {"num-examples": 1, "evaluation-withheld": 1, "evaluation-refused": 1}


def charged(state_dir):
    return ClientAccountant.from_state_dict(ClientStateStore(state_dir).load("accountant")).history


@pytest.mark.parametrize("node_says", [{"evaluate": False}, {"split": "none"}])
def test_a_node_that_evaluates_nothing_sends_nothing_measured_and_is_charged_nothing(tmp_path, node_says):
    # Prepare: a DP round, then the coordinator asks for an evaluation the node's own config rules out.
    state_dir = new_state(tmp_path)
    config = run_config(tmp_path, **{"noise-multiplier": 1.0})
    reply, _ = train_round(config, 1, deployed(state_dir, **node_says))
    before = charged(state_dir)
    # Execute
    answer = evaluate(config, reply.content["arrays"], 1, deployed(state_dir, **node_says))
    # Assert: no number about the data, no ledger entry, no charge; the final tower is still kept for serving.
    assert dict(answer.content["metrics"]) == NOTHING_MEASURED
    assert "ledger" not in answer.content
    assert charged(state_dir) == before


def test_split_none_trains_on_every_event_and_the_run_config_cannot_override_the_node(tmp_path):
    config = run_config(tmp_path, **{"split": "leave-one-out", "eval-negatives": 20})
    node = {"partition-id": 0, "num-partitions": 3}
    everything = load_node_data(RunSettings.from_run_config(config), {**node, "split": "none"}).split
    held_out = load_node_data(RunSettings.from_run_config(config), node).split
    assert everything.kind == "none" and held_out.kind == "leave-one-out"
    assert everything.train.items.size == held_out.train.items.size + held_out.test.items.size


def test_a_dp_evaluation_never_releases_the_sampled_negative_sums(tmp_path):
    state_dir = new_state(tmp_path)
    config = run_config(tmp_path, **{"noise-multiplier": 1.0, "split": "leave-one-out", "eval-negatives": 20})
    reply, _ = train_round(config, 1, deployed(state_dir))
    metrics = dict(evaluate(config, reply.content["arrays"], 1, deployed(state_dir)).content["metrics"])
    assert "dp-evaluation" in metrics
    assert not [key for key in metrics if key.startswith("sampled")]


def test_whether_a_node_evaluates_depends_on_its_protocol_not_on_its_data(tmp_path):
    # Prepare: a deployed DP node whose every user has one event: the temporal split holds nothing of theirs
    # out. A refusal here would tell the coordinator so outside DP; the node releases DP sums as any node does.
    dataset, _ = resolve_dataset(DATA)
    ids = dataset.catalogue.index.ids
    log = tmp_path / "events.csv"
    log.write_text("user,item,behaviour,timestamp\n" + "".join(f"s{u},{ids[u]},purchase,{1000 + u}\n"
                                                                for u in range(30)))  # fmt: skip
    state_dir = new_state(tmp_path)
    node = {"data-path": str(log), "state-dir": str(state_dir), "dp-population-users": 30,
            "allow-plaintext-state": True}  # fmt: skip
    config = run_config(tmp_path, **{"noise-multiplier": 1.0})
    reply, _ = train_round(config, 1, node)
    # Execute
    metrics = dict(evaluate(config, reply.content["arrays"], 1, node).content["metrics"])
    # Assert
    assert "dp-evaluation" in metrics and "evaluation-refused" not in metrics


def test_a_non_private_evaluation_sends_sampled_sums_next_to_the_ranking_sums(tmp_path):
    config = run_config(tmp_path, **{"split": "leave-one-out", "eval-negatives": 20, "sampled-k": 5})
    node = {"partition-id": 1, "num-partitions": 3}
    reply, _ = train_round(config, 1, node)
    metrics = dict(evaluate(config, reply.content["arrays"], 1, node).content["metrics"])
    split = load_node_data(RunSettings.from_run_config(config), node).split
    assert metrics["sampled-rows"] == len(split.users) == metrics["users"]
    assert metrics["sampled-negatives"] == 20 and 0 <= metrics["sampled-hits"] <= metrics["sampled-rows"]
    assert metrics["sampled-k"] == 5


def test_a_deployed_site_evaluates_on_its_own_test_file(tmp_path):
    # Prepare: data-path is all the site trains on; test-path is next period's events.
    dataset, _ = resolve_dataset(DATA)
    ids = dataset.catalogue.index.ids
    (tmp_path / "train.csv").write_text("user,item\n" + "".join(f"s{u % 5},{ids[u]}\n" for u in range(20)))
    (tmp_path / "next.csv").write_text(f"user,item\ns0,{ids[50]}\ns1,{ids[51]}\nstranger,{ids[52]}\n")
    node = {"data-path": str(tmp_path / "train.csv"), "test-path": str(tmp_path / "next.csv"),
            "state-dir": str(new_state(tmp_path)), "allow-plaintext-state": True}  # fmt: skip
    # Execute
    data = load_node_data(RunSettings.from_run_config(run_config(tmp_path, **{"event-order": "file"})), node)
    # Assert: 20 train events, the two test rows of known users (the stranger is reported, not evaluated).
    assert data.split.kind == "given" and data.split.train.items.size == 20
    assert [ids[i] for i in data.split.test.items] == [ids[50], ids[51]]


def test_the_ncf_papers_files_become_a_given_split_and_bad_lines_are_reported(tmp_path):
    from fedtower.data.ncf_files import convert_ncf

    # Prepare: the NCF layout (tab separated, no header; the test pair in parentheses), one bad line in each.
    (tmp_path / "ml.train.rating").write_text("0\t32\t4\t978824330\n0\t34\t4\t978824331\n1\t32\t5\t978300760\n"
                                              "1\t40\t3\t978300761\nbad line\n")  # fmt: skip
    (tmp_path / "ml.test.negative").write_text("(0,40)\t1\t2\t3\n(1,34)\t1\t2\t3\n0,5\t1\n")
    # Execute
    report = convert_ncf(tmp_path / "ml.train.rating", tmp_path / "ml.test.negative", tmp_path / "out")
    given = load_given_split(tmp_path / "out" / "train.csv", tmp_path / "out" / "test.csv")
    # Assert
    assert [(issue.file.rsplit("/", 1)[-1], issue.line) for issue in report.issues] == [("ml.train.rating", 5),
                                                                                     ("ml.test.negative", 3)]
    assert report.rows_read == 8 and report.rows_kept == 6
    ids = given.catalogue.index.ids
    assert [ids[i] for i in given.test["item"]] == ["40", "34"]
    assert [[ids[i] for i in row] for row in given.negatives] == [["1", "2", "3"]] * 2
    assert given.train_events["timestamp"].tolist() == [978824330, 978824331, 978300760, 978300761]
    assert given.report.rows_skipped == 0


def test_taste_skew_on_a_catalogue_without_categories_names_the_setting(tmp_path):
    from fedtower.data.partition import PartitionConfig, partition_users

    train = write(tmp_path / "train.csv", "user,item\n1,10\n1,11\n2,11\n3,12\n")
    test = write(tmp_path / "test.csv", "user,item\n1,12\n")
    dataset = load_given_split(train, test, order="file").dataset
    with pytest.raises(ValueError, match="this catalogue has no categories.*set taste-skew = 0"):
        partition_users(dataset, PartitionConfig(scheme="sites", num_partitions=2, taste_skew=0.5))
    assert sum(map(len, partition_users(dataset, PartitionConfig(scheme="sites", num_partitions=2)).values())) == 3
