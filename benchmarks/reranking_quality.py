"""What serving's re-rankers, cold start and quantization do to quality (BENCHMARKS.md protocol).

    python benchmarks/reranking_quality.py --data ../shared/data/ml-latest-small

Model A (every user's training interactions) is served through
`Recommender.recommend` for every test user, plain and re-ranked (MMR
diversity, category caps, novelty penalty), and with fp16 / int8 item tables:
NDCG@20, coverage@20, novelty@20 and intra-list diversity@20 (1 - cosine of
item embeddings, and of genre vectors).

Model B holds out a share of users (cold users: never trained on) and a share
of items (new items: no interaction of anyone in training). Cold users get
`recommend_for_history` from their first 1, 3 and 5 events (no training; the
default shrinks the pooled events towards the site's mean user, and pooling
alone is reported too), against the popularity baseline on the same events
excluded. New items get
content-only vectors (`embed_new_items`); new-item recall@20 ranks only the
new items for each warm user with a test interaction on one, against a
random order (expected recall 20 / number of new items).

Progress goes to stderr; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from fedtower.central import build_model
from fedtower.data.prepared import UserHistories, prepare_split
from fedtower.data.protocols import SplitSpec
from fedtower.data.sources import resolve_dataset
from fedtower.metrics import coverage_at_k, intra_list_diversity, ndcg_at_k, novelty_at_k, recall_at_k
from fedtower.models.training import TrainConfig, evaluate, train
from fedtower.serving import Recommender, ServingConfig

K = 20


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serve_and_score(recommender, users, relevant, popularity, num_users, item_vectors, genre_vectors,
                    **options) -> dict:  # fmt: skip
    """Top K for each user through the Recommender, then the BENCHMARKS.md metrics."""
    index = recommender.catalogue.index
    lists, ndcg = [], []
    started = time.perf_counter()
    for user, test_items in zip(users, relevant, strict=True):
        recs = recommender.recommend(user, K, **options)
        rows = np.full(K, -1, dtype=np.int64)
        rows[: len(recs)] = index.rows([r.item for r in recs])
        lists.append(rows)
        ndcg.append(ndcg_at_k(rows, test_items, K))
    top = np.vstack(lists)
    return {
        f"ndcg@{K}": float(np.mean(ndcg)),
        f"coverage@{K}": coverage_at_k(top, len(index)),
        f"novelty@{K}": novelty_at_k(top, popularity, num_users),
        f"diversity@{K}": float(np.nanmean([intra_list_diversity(r, item_vectors) for r in top])),
        f"genre_diversity@{K}": float(np.nanmean([intra_list_diversity(r, genre_vectors) for r in top])),
        "ms_per_user": 1e3 * (time.perf_counter() - started) / len(users),
    }


def train_model(dataset, split_train: UserHistories, num_items: int, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    holder = type("Split", (), {"num_items": num_items, "users": split_train.users})()
    model = build_model(dataset, holder, dim=args.dim)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    started = time.perf_counter()
    train(model, split_train, config,
          progress=lambda log: progress(f"  epoch {log['epoch']:>3}/{args.epochs} loss {log['loss']:.4f}"))  # fmt: skip
    progress(f"  trained in {time.perf_counter() - started:.0f} s")
    return model


def restrict(histories: UserHistories, keep_user: np.ndarray, keep_item: np.ndarray) -> UserHistories:
    """The same users (rows), with the interactions of dropped users or items removed."""
    lists, weights = [], []
    for u in range(len(histories)):
        items, w = histories.items_of(u), histories.weights_of(u)
        mask = keep_item[items] & keep_user[u]
        lists.append(items[mask])
        weights.append(w[mask])
    indptr = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=indptr[1:])
    return UserHistories(histories.users, indptr, np.concatenate(lists).astype(np.int64),
                         np.concatenate(weights).astype(np.float32))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="dataset folder or synthetic spec")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--cold-users", type=float, default=0.2, help="share of users held out of model B")
    parser.add_argument("--new-items", type=float, default=0.1, help="share of items held out of model B")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    dataset, _ = resolve_dataset(args.data)
    split = prepare_split(dataset)
    catalogue, n = dataset.catalogue, split.num_items
    popularity = split.popularity()
    num_users = int((split.train.lengths() > 0).sum())
    genre_columns = [j for j, name in enumerate(catalogue.feature_names) if name.startswith("category:")]
    genre_vectors = catalogue.features[:, genre_columns] if genre_columns else np.eye(n, 1)
    evaluated = [u for u in range(len(split.users)) if len(split.test.items_of(u))]
    users = [split.users[u] for u in evaluated]
    relevant = [split.test.items_of(u) for u in evaluated]

    # ---- model A: re-ranking and quantization
    progress(f"Model A on {dataset.name}: {len(split.users)} users, {n} items, dim {args.dim}")
    model = train_model(dataset, split.train, n, args)
    reference = evaluate(model, split.train, split.test, k=K, popularity=popularity).finalize()
    variants = {
        "plain": {},
        "mmr-0.1": {"diversity": 0.1}, "mmr-0.3": {"diversity": 0.3}, "mmr-0.5": {"diversity": 0.5},
        "cap-3": {"category_cap": 3}, "cap-5": {"category_cap": 5},
        "novelty-0.5": {"novelty": 0.5}, "novelty-1": {"novelty": 1.0}, "novelty-2": {"novelty": 2.0},
    }  # fmt: skip
    reranking, quantization = {}, {}
    base = Recommender.from_model(model, catalogue, split.train)
    item_vectors = base.table.vectors
    for name, options in variants.items():
        reranking[name] = serve_and_score(base, users, relevant, popularity, num_users, item_vectors,
                                          genre_vectors, **options)  # fmt: skip
        progress(f"  {name:<12} " + "  ".join(f"{k} {v:.4f}" for k, v in reranking[name].items()))
    for precision in ("fp32", "fp16", "int8"):
        served = Recommender.from_model(model, catalogue, split.train, config=replace_precision(base, precision))
        scores = serve_and_score(served, users, relevant, popularity, num_users, item_vectors, genre_vectors)
        quantization[precision] = {"table_bytes": served.table.nbytes, f"ndcg@{K}": scores[f"ndcg@{K}"],
                                   "int8_kernel": served.table._int8 is not None}  # fmt: skip
    for precision in ("fp16", "int8"):
        q = quantization[precision]
        q["relative_ndcg_change"] = q[f"ndcg@{K}"] / quantization["fp32"][f"ndcg@{K}"] - 1
        q["size_ratio"] = q["table_bytes"] / quantization["fp32"]["table_bytes"]
        progress(f"  {precision}: {q['table_bytes'] / 2**20:.2f} MiB ({q['size_ratio']:.2f}x), NDCG@20 "
                 f"{q[f'ndcg@{K}']:.4f} ({100 * q['relative_ndcg_change']:+.2f}%)")  # fmt: skip

    # ---- model B: cold users and new items held out of training
    rng = np.random.default_rng(args.seed)
    cold = np.zeros(len(split.users), dtype=bool)
    cold[rng.choice(len(split.users), int(args.cold_users * len(split.users)), replace=False)] = True
    new = np.zeros(n, dtype=bool)
    tested = np.unique(split.test.items)
    new[rng.choice(tested, int(args.new_items * len(tested)), replace=False)] = True
    progress(f"Model B: {cold.sum()} cold users and {new.sum()} new items held out of training")
    train_b = restrict(split.train, ~cold, ~new)
    model_b = train_model(dataset, train_b, n, args)
    served_b = Recommender.from_model(model_b, catalogue, train_b)
    pooling_only = Recommender.from_model(model_b, catalogue, train_b,
                                          config=replace(served_b.config, cold_prior=False))  # fmt: skip
    warm_popularity = np.bincount(train_b.items, minlength=n).astype(np.float64)
    cold_start = {}
    for events in (1, 3, 5):
        model_ndcg, pooled_ndcg, pop_ndcg = [], [], []
        for u in np.flatnonzero(cold):
            first = split.train.items_of(u)[:events]
            test_items = split.test.items_of(u)
            if len(first) < events or not len(test_items):
                continue
            for recommender, scores in ((served_b, model_ndcg), (pooling_only, pooled_ndcg)):
                recs = recommender.recommend_for_history([catalogue.index.ids[r] for r in first], K)
                scores.append(ndcg_at_k(catalogue.index.rows([r.item for r in recs]), test_items, K))
            by_popularity = warm_popularity.copy()
            by_popularity[first] = -np.inf
            top = np.lexsort((np.arange(n), -by_popularity))[:K]
            pop_ndcg.append(ndcg_at_k(top, test_items, K))
        cold_start[str(events)] = {
            f"ndcg@{K}": float(np.mean(model_ndcg)),
            f"pooling_only_ndcg@{K}": float(np.mean(pooled_ndcg)),
            f"popularity_ndcg@{K}": float(np.mean(pop_ndcg)),
            "users": len(model_ndcg),
        }
        row = cold_start[str(events)]
        progress(f"  cold start, {events} event(s): NDCG@20 {row[f'ndcg@{K}']:.4f} (pooling alone "
                 f"{row[f'pooling_only_ndcg@{K}']:.4f}) vs popularity {row[f'popularity_ndcg@{K}']:.4f}")  # fmt: skip
    new_rows = np.flatnonzero(new)
    content = served_b.embed_new_items(catalogue.features[new_rows])
    recalls = []
    for u in np.flatnonzero(~cold):
        wanted = np.intersect1d(split.test.items_of(u), new_rows)
        if not len(wanted):
            continue
        vector = served_b.user_vector(split.users[u])
        order = new_rows[np.lexsort((new_rows, -(content @ vector)))][:K]
        recalls.append(recall_at_k(order, wanted, K))
    new_items = {f"recall@{K}": float(np.mean(recalls)), f"random_recall@{K}": min(1.0, K / len(new_rows)),
                 "users": len(recalls), "new_items": int(len(new_rows))}  # fmt: skip
    progress(f"  new items: recall@20 {new_items[f'recall@{K}']:.4f} among {len(new_rows)} new items vs "
             f"random {new_items[f'random_recall@{K}']:.4f} ({len(recalls)} users)")  # fmt: skip

    result = {
        "dataset": dataset.name, "users": len(users), "items": n, "dim": args.dim, "epochs": args.epochs,
        "reference_ndcg@20": reference[f"ndcg@{K}"],
        "plain_matches_evaluate": abs(reranking["plain"][f"ndcg@{K}"] - reference[f"ndcg@{K}"]) < 1e-9,
        "reranking": reranking, "quantization": quantization,
        "cold_start": cold_start, "new_items": new_items, "seconds": time.perf_counter() - started,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }  # fmt: skip
    result["protocol"] = SplitSpec().describe()  # every figure here is on the temporal split
    print(json.dumps(result))
    return result


def replace_precision(recommender: Recommender, precision: str) -> ServingConfig:
    return replace(recommender.config, precision=precision)


if __name__ == "__main__":
    main()
