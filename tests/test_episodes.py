"""Task distributions, meta-splits, episode sampling and the embedding cache on tiny synthetic tasks."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Array2D, ClassLabel, Dataset, Features, Value

from ocd_hf.episodes import EpisodeSampler, TaskDistribution, UnknownSplitError, embed_items

SIZES = [6, 7, 8, 9, 10, 6, 7, 8, 9, 10]  # items per class of the synthetic task


def synthetic(sizes=SIZES, prefix: str = "c") -> Dataset:
    """Class ``c`` has ``sizes[c]`` items; the text of item ``i`` of class ``c`` is ``"c<c> <i>"``."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    order = np.random.default_rng(0).permutation(len(labels))  # classes interleaved, as in real data
    labels = labels[order]
    return Dataset.from_dict(
        {
            "text": [f"{prefix}{label} {row}" for row, label in enumerate(labels)],
            "label": labels.tolist(),
            "label_name": [f"{prefix}{label}" for label in labels],
        }
    )


def encode(texts: list[str]) -> np.ndarray:
    """A deterministic 3-d "embedding": class, row and a constant."""
    return np.array([[float(t.split()[0][1:]), float(t.split()[1]), 1.0] for t in texts], dtype=np.float32)


# --- meta-splits -------------------------------------------------------------------------------


def test_class_split_fractions_are_disjoint_cover_the_classes_and_are_recorded():
    distribution = TaskDistribution(synthetic())
    split = distribution.class_split((0.6, 0.2, 0.2), seed=0)
    classes = {name: set(part.classes.tolist()) for name, part in split.items()}
    assert list(split) == ["train", "val", "test"]
    assert [len(c) for c in classes.values()] == [6, 2, 2]
    assert classes["train"].isdisjoint(classes["val"]) and classes["train"].isdisjoint(classes["test"])
    assert classes["val"].isdisjoint(classes["test"])
    assert set.union(*classes.values()) == set(range(10))
    assert split.record["level"] == "class" and split.record["seed"] == 0 and split.record["unused_classes"] == []
    assert {k: set(v) for k, v in split.record["classes"].items()} == classes
    # every row of a split belongs to one of its classes, and all of them are there
    for name, part in split.items():
        rows = np.concatenate([part.rows_of(c) for c in part.classes])
        assert set(distribution.row_labels[rows]) == classes[name]
        assert len(rows) == sum(SIZES[c] for c in classes[name])
    assert distribution.class_split(seed=0).record == split.record
    assert any(distribution.class_split(seed=s).record["classes"] != split.record["classes"] for s in range(1, 4))


def test_class_split_with_explicit_classes_by_id_or_name():
    split = TaskDistribution(synthetic()).class_split({"train": [0, 1, "c2"], "test": [7]})
    assert split["train"].classes.tolist() == [0, 1, 2] and split["test"].classes.tolist() == [7]
    assert split["train"].class_names == {0: "c0", 1: "c1", 2: "c2"}
    assert split.record["unused_classes"] == [3, 4, 5, 6, 8, 9]
    assert "test" in split and "val" not in split


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": [0, 1], "test": [1, 2]}, "class 1 ('c1') is in both 'train' and 'test'"),
        ({"train": [0, "c42"]}, "names class 'c42'"),
        ({"train": [0, 99]}, "names class 99"),
        ({"train": [0], "test": []}, "split 'test' of 'dataset' would have no classes"),
        ((0.5, 0.2, 0.2), "must be positive and sum to 1"),
        ((0.98, 0.01, 0.01), "split 'val' (fraction 0.01) gets none of the 10 classes"),
        ((0.25, 0.25, 0.25, 0.25), "got 4 fractions; pass 3 (train/val/test), 2 (train/test)"),
        ({"train": 0.8, "test": [1]}, "mixes fractions and class lists"),
    ],
)
def test_class_split_errors(splits, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TaskDistribution(synthetic()).class_split(splits)


def test_unknown_split_name_lists_the_known_ones():
    split = TaskDistribution(synthetic()).class_split((0.5, 0.5))
    with pytest.raises(UnknownSplitError) as error:
        split["val"]
    assert str(error.value) == "unknown split 'val'; this meta-split has ['train', 'test']."


def test_dataset_level_split():
    a, b = synthetic(SIZES[:4], prefix="a"), synthetic(SIZES[4:7], prefix="b")
    distribution = TaskDistribution.from_datasets({"a": a, "b": b})
    assert distribution.num_classes == 7 and len(distribution.dataset) == len(a) + len(b)
    split = distribution.dataset_split({"train": ["a"], "test": ["b"]})
    assert split.record == {
        "level": "dataset",
        "datasets": {"train": ["a"], "test": ["b"]},
        "classes": {"train": [0, 1, 2, 3], "test": [4, 5, 6]},
        "unused_datasets": [],
    }
    assert split["test"].class_names == {4: "b/b0", 5: "b/b1", 6: "b/b2"}
    episode = EpisodeSampler(split["test"], n_way=3, k_shot=2, q_queries=3, seed=0).sample(20)
    rows = torch.cat([episode.support_index.reshape(-1), episode.query_index.reshape(-1)])
    assert (rows >= len(a)).all()
    texts = distribution.dataset.select(rows.tolist())["text"]
    assert all(t.startswith("b") for t in texts)
    # a class split of the combined distribution pools the classes of both datasets
    assert sum(part.num_classes for part in distribution.class_split((0.5, 0.5)).values()) == 7


def test_dataset_level_split_errors():
    a, b = synthetic(SIZES[:3], prefix="a"), synthetic(SIZES[3:6], prefix="b")
    distribution = TaskDistribution.from_datasets({"a": a, "b": b})
    with pytest.raises(ValueError, match=r"names dataset 'c'; known datasets: \['a', 'b'\]"):
        distribution.dataset_split({"train": ["a"], "test": ["c"]})
    with pytest.raises(ValueError, match="dataset 'a' is in both 'train' and 'test'"):
        distribution.dataset_split({"train": ["a"], "test": ["a", "b"]})
    with pytest.raises(ValueError, match=r"was not built from several datasets; build it with TaskDistribution.from_datasets"):
        TaskDistribution(a).dataset_split({"train": ["a"]})
    with pytest.raises(ValueError, match=r"bring them to the same columns first \(ds.select_columns"):
        TaskDistribution.from_datasets({"a": a, "b": b.remove_columns("text")})
    with pytest.raises(ValueError, match="pass at least one dataset"):
        TaskDistribution.from_datasets({})


def test_distribution_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"no column 'y' .*pass label_column="):
        TaskDistribution(synthetic(), label_column="y")
    with pytest.raises(ValueError, match=r"encode it first with dataset.class_encode_column\('label_name'\)"):
        TaskDistribution(synthetic(), label_column="label_name")
    with pytest.raises(ValueError, match=r"2 rows have a negative label .*dataset.filter"):
        TaskDistribution(Dataset.from_dict({"label": [0, -1, 1, -1]}))
    with pytest.raises(ValueError, match="the dataset is empty"):
        TaskDistribution(Dataset.from_dict({"label": []}, features=Features({"label": Value("int64")})))


def test_class_names_from_a_class_label_feature_and_drop_small_classes():
    dataset = Dataset.from_dict({"label": [0, 0, 0, 1, 2, 2]}, features=Features({"label": ClassLabel(names=["x", "y", "z"])}))
    distribution = TaskDistribution(dataset)
    assert distribution.class_names == {0: "x", 1: "y", 2: "z"}
    assert distribution.class_sizes.tolist() == [3, 1, 2]
    kept = distribution.drop_small_classes(2)
    assert kept.classes.tolist() == [0, 2] and kept.rows_of(2).tolist() == [4, 5]
    with pytest.raises(ValueError, match=r"no class of 'dataset' has 4 items \(the largest has 3\)"):
        distribution.drop_small_classes(4)


# --- episodes ----------------------------------------------------------------------------------


def test_same_seed_same_episodes_and_different_seeds_differ():
    distribution = TaskDistribution(synthetic())

    def draw(seed):
        sampler = EpisodeSampler(distribution, n_way=4, k_shot=2, q_queries=3, seed=seed)
        return sampler.sample(30), sampler.sample(5)

    (first, more), (again, more_again), (other, _) = draw(7), draw(7), draw(8)
    for x, y in ((first, again), (more, more_again)):
        assert torch.equal(x.support_index, y.support_index) and torch.equal(x.query_index, y.query_index)
        assert torch.equal(x.classes, y.classes)
    assert not torch.equal(first.support_index, other.support_index)
    assert not torch.equal(first.support_index[:5], more.support_index)  # the stream moves on


def test_each_episode_has_n_classes_k_support_q_queries_and_disjoint_support_and_query():
    distribution = TaskDistribution(synthetic())
    n, k, q, e = 5, 2, 4, 200
    episode = EpisodeSampler(distribution, n_way=n, k_shot=k, q_queries=q, seed=0).sample(e)
    assert episode.support_index.shape == (e, n, k) and episode.query_index.shape == (e, n, q)
    assert episode.classes.shape == (e, n) and len(episode) == e
    labels = torch.from_numpy(distribution.row_labels)
    assert (labels[episode.support_index] == episode.classes[:, :, None]).all()
    assert (labels[episode.query_index] == episode.classes[:, :, None]).all()
    for i in range(e):
        assert len(set(episode.classes[i].tolist())) == n
        support, query = set(episode.support_index[i].reshape(-1).tolist()), set(episode.query_index[i].reshape(-1).tolist())
        assert len(support) == n * k and len(query) == n * q and support.isdisjoint(query)


def test_labels_are_a_random_permutation_per_episode():
    distribution = TaskDistribution(synthetic())
    n, k, q = 4, 3, 2
    episode = EpisodeSampler(distribution, n_way=n, k_shot=k, q_queries=q, seed=0).sample(300)
    assert episode.support_labels.shape == (300, n * k) and episode.query_labels.shape == (300, n * q)
    for labels, per_class in ((episode.support_labels, k), (episode.query_labels, q)):
        assert (labels.sort(dim=1).values == torch.arange(n).repeat_interleave(per_class)).all()
    # the label a class gets varies from episode to episode, uniformly over 0..N-1
    label_of_class = Counter((int(c), j) for row in episode.classes for j, c in enumerate(row))
    for class_id in range(10):
        counts = [label_of_class[(class_id, j)] for j in range(n)]
        assert min(counts) > 0.4 * sum(counts) / n
    assert len({tuple(row.tolist()) for row in episode.classes}) > 250


def test_items_are_drawn_uniformly_within_a_class():
    distribution = TaskDistribution(synthetic())
    episode = EpisodeSampler(distribution, n_way=10, k_shot=2, q_queries=4, seed=3).sample(2000)
    used = Counter(torch.cat([episode.support_index.reshape(-1), episode.query_index.reshape(-1)]).tolist())
    support = Counter(episode.support_index.reshape(-1).tolist())
    for class_id, size in enumerate(SIZES):
        rows = distribution.rows_of(class_id)
        expected = 2000 * 6 / size
        assert all(abs(used[r] - expected) < 0.15 * expected for r in rows)
        assert all(abs(support[r] - expected / 3) < 0.25 * expected / 3 for r in rows)


def test_sampling_600_episodes_is_vectorised():
    distribution = TaskDistribution(synthetic([40] * 45))
    sampler = EpisodeSampler(distribution, n_way=5, k_shot=5, q_queries=15, seed=0)
    sampler.sample(600)  # warm-up
    start = time.perf_counter()
    episode = sampler.sample(600)
    assert time.perf_counter() - start < 0.5
    assert episode.query_index.shape == (600, 5, 15)


def test_episode_tensors_match_the_cached_embeddings_row_by_row(tmp_path):
    dataset = embed_items(synthetic(), encode, "text", batch_size=16, cache_dir=tmp_path, encoder_id="test-encoder")
    distribution = TaskDistribution(dataset)
    episode = EpisodeSampler(distribution, n_way=3, k_shot=2, q_queries=3, seed=0).sample(8, column="embedding")
    assert episode.support.shape == (8, 6, 3) and episode.query.shape == (8, 9, 3)
    assert episode.support.dtype == torch.float32
    embeddings = np.asarray(dataset.with_format("numpy")[:]["embedding"])
    for e in range(8):
        for position, row in enumerate(episode.support_index[e].reshape(-1).tolist()):
            assert np.array_equal(episode.support[e, position].numpy(), embeddings[row])
        for position, row in enumerate(episode.query_index[e].reshape(-1).tolist()):
            assert np.array_equal(episode.query[e, position].numpy(), embeddings[row])
    # the embedding's first coordinate is the class id: labels and classes agree with the tensors
    assert torch.equal(episode.support[..., 0].long(), episode.classes.gather(1, episode.support_labels))
    assert torch.equal(episode.query[..., 0].long(), episode.classes.gather(1, episode.query_labels))
    one = episode[2]
    assert len(one) == 1 and torch.equal(one.support[0], episode.support[2]) and torch.equal(episode[-1].classes[0], episode.classes[-1])
    with pytest.raises(IndexError, match="episode 8 out of range for a batch of 8"):
        episode[8]


def test_sampler_errors_name_the_fix():
    distribution = TaskDistribution(synthetic())
    with pytest.raises(ValueError, match=r"11-way episodes need 11 classes but 'dataset' has 10; lower n_way"):
        EpisodeSampler(distribution, n_way=11, k_shot=1)
    with pytest.raises(ValueError, match=r"4 classes of 'train' have fewer than k_shot \+ q_queries = 8 items: 'c0' \(id 0\): 6, "
                       r"'c1' \(id 1\): 7, 'c5' \(id 5\): 6, 'c6' \(id 6\): 7\. .*drop_small_classes\(8\)"):
        EpisodeSampler(distribution.class_split({"train": list(range(10))})["train"], n_way=2, k_shot=3, q_queries=5)
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1, got 0"):
        EpisodeSampler(distribution, n_way=2, k_shot=0)
    sampler = EpisodeSampler(distribution, n_way=2, k_shot=1, q_queries=1)
    with pytest.raises(ValueError, match="num_episodes must be an integer >= 1"):
        sampler.sample(0)
    with pytest.raises(ValueError, match=r"no column 'embedding' .*embed_items"):
        sampler.sample(2, column="embedding")
    with pytest.raises(ValueError, match="column 'text' holds text; embed it with embed_items"):
        sampler.sample(2, column="text")
    with pytest.raises(ValueError, match="the features have 3 rows; pass the features of the whole dataset"):
        sampler.sample(5).with_features(torch.zeros(3, 2))


# --- embedding cache ---------------------------------------------------------------------------


def test_embedding_cache_is_reused_and_invalidated_when_the_dataset_changes(tmp_path):
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return encode(texts)

    dataset = synthetic()
    first = embed_items(dataset, counting, "text", batch_size=32, cache_dir=tmp_path, encoder_id="counting")
    assert sum(calls) == len(dataset) and len(calls) == 3
    assert first.features["embedding"].length == 3 and first.features["embedding"].feature.dtype == "float32"
    again = embed_items(dataset, counting, "text", batch_size=32, cache_dir=tmp_path, encoder_id="counting")
    assert sum(calls) == len(dataset)  # not called again
    assert np.array_equal(again.with_format("numpy")[:]["embedding"], first.with_format("numpy")[:]["embedding"])
    assert np.array_equal(first.with_format("numpy")[:]["embedding"], encode(dataset["text"]))

    changed = dataset.map(lambda row: {"text": row["text"].replace("c1 ", "c11 ")})
    embedded = embed_items(changed, counting, "text", batch_size=32, cache_dir=tmp_path, encoder_id="counting")
    assert sum(calls) == 2 * len(dataset)
    assert np.array_equal(embedded.with_format("numpy")[:]["embedding"], encode(changed["text"]))
    subset = dataset.select(range(5))
    embed_items(subset, counting, "text", cache_dir=tmp_path, encoder_id="counting")
    assert sum(calls) == 2 * len(dataset) + 5
    embed_items(dataset, counting, "text", batch_size=32, cache_dir=tmp_path, encoder_id="another encoder")
    assert sum(calls) == 3 * len(dataset) + 5
    assert len(list(tmp_path.glob("embeddings-*.arrow"))) == 4 and not list(tmp_path.glob(".*partial"))


def test_embed_items_passes_image_batches_as_arrays(tmp_path):
    images = np.arange(6 * 4 * 4, dtype=np.float32).reshape(6, 4, 4)
    dataset = Dataset.from_dict(
        {"image": images, "label": [0, 0, 0, 1, 1, 1]}, features=Features({"image": Array2D((4, 4), "float32"), "label": Value("int64")})
    )
    seen = []

    def flatten(batch):
        seen.append(type(batch))
        return torch.from_numpy(batch.reshape(len(batch), -1))

    embedded = embed_items(dataset, flatten, "image", batch_size=4, cache_dir=tmp_path, encoder_id="flatten")
    assert seen == [np.ndarray, np.ndarray]
    assert np.array_equal(embedded.with_format("numpy")[:]["embedding"], images.reshape(6, 16))
    episode = EpisodeSampler(TaskDistribution(embedded), n_way=2, k_shot=1, q_queries=2, seed=0).sample(3, column="image")
    assert episode.support.shape == (3, 2, 4, 4)
    assert torch.equal(episode.support[0, 0], torch.from_numpy(images[episode.support_index[0, 0, 0]]))


@pytest.mark.parametrize(
    ("encode_fn", "message"),
    [
        (lambda texts: np.zeros((len(texts), 3, 1)), r"returned shape \(16, 3, 1\) for rows 0..15; it must return \(16, d\)"),
        (lambda texts: np.zeros((1, 3)), r"returned shape \(1, 3\) for rows 0..15"),
        (lambda texts: np.full((len(texts), 3), np.nan), "non-finite values for rows 0..15"),
    ],
)
def test_embed_items_rejects_bad_encoder_output(tmp_path, encode_fn, message):
    with pytest.raises(ValueError, match=message):
        embed_items(synthetic(), encode_fn, "text", batch_size=16, cache_dir=tmp_path, encoder_id="bad")
    assert list(tmp_path.iterdir()) == []  # neither a cache file nor a partial one is left


def test_embed_items_changing_width_and_argument_errors(tmp_path):
    widths = iter([3, 4])
    with pytest.raises(ValueError, match=r"returned shape \(16, 4\) for rows 16..31; it must return \(16, 3\)"):
        embed_items(synthetic(), lambda t: np.zeros((len(t), next(widths))), "text", batch_size=16, cache_dir=tmp_path, encoder_id="w")
    with pytest.raises(ValueError, match=r"no column 'sentence'"):
        embed_items(synthetic(), encode, "sentence", cache_dir=tmp_path, encoder_id="x")
    with pytest.raises(ValueError, match=r"already has a column 'label'; pass another output_column="):
        embed_items(synthetic(), encode, "text", cache_dir=tmp_path, encoder_id="x", output_column="label")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        embed_items(synthetic(), encode, "text", batch_size=0, cache_dir=tmp_path, encoder_id="x")
    with pytest.raises(ValueError, match=r"encoder_id must name the encoder and its settings, e.g. 'sentence-transformers/"):
        embed_items(synthetic(), encode, "text", cache_dir=tmp_path, encoder_id=" ")
    with pytest.raises(TypeError, match="encoder_id"):
        embed_items(synthetic(), encode, "text", cache_dir=tmp_path)


def test_benchmark_episodes_are_fixed_per_split_and_never_shared_between_splits():
    split = TaskDistribution(synthetic([8] * 20)).class_split((0.5, 0.25, 0.25), seed=0)
    episodes = split.benchmark_episodes(3, 1, 2, 8)
    assert list(episodes) == ["val", "test"]  # never the meta-train split
    again = split.benchmark_episodes(3, 1, 2, 8)
    for name, offset in (("val", 0), ("test", 1)):
        expected = EpisodeSampler(split[name], 3, 1, 2, seed=10_000 + offset).sample(8)
        assert torch.equal(episodes[name].support_index, expected.support_index) and torch.equal(again[name].query_index, expected.query_index)
    val_items = set(episodes["val"].support_index.flatten().tolist())
    assert not val_items & set(episodes["test"].support_index.flatten().tolist())  # disjoint classes, so disjoint items
