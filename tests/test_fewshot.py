"""The shared few-shot head benchmark on synthetic Gaussian-cluster tasks (offline, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers.tolerances import adam_delta_atol
from torch.nn import functional as F

from ocd_hf.episodes import EpisodeSampler, TaskDistribution
from ocd_hf.fewshot import (
    adam_fitter,
    episode_accuracy,
    evaluate_episodes,
    head_logits,
    logistic_regression_heads,
    mean_ci95,
    prototype_heads,
    query_label_bound_heads,
)
from ocd_hf.results import ResultsTable


def cluster_episodes(num_episodes: int = 40, n_way: int = 5, k_shot: int = 3, dim: int = 8, seed: int = 0):
    """Episodes over 12 Gaussian clusters on the unit sphere (noisy: accuracy well below 100%)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(12, dim, generator=generator), dim=-1)
    labels = torch.arange(12).repeat_interleave(30)
    points = F.normalize(centres[labels] + 0.45 * torch.randn(len(labels), dim, generator=generator), dim=-1)
    dataset = Dataset.from_dict({"embedding": points.tolist(), "label": labels.tolist()})
    sampler = EpisodeSampler(TaskDistribution(dataset), n_way, k_shot, q_queries=5, seed=seed)
    return sampler.sample(num_episodes, column="embedding")


def test_logistic_regression_heads_predict_like_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    for n_way in (2, 5):
        episodes = cluster_episodes(6, n_way=n_way)
        heads = logistic_regression_heads(episodes.support, episodes.support_labels, n_way)
        assert heads.shape == (6, n_way, 9)
        ours = head_logits(heads, episodes.query).argmax(-1)
        for index in range(6):
            model = LogisticRegression(max_iter=1000).fit(episodes.support[index].double().numpy(), episodes.support_labels[index].numpy())
            np.testing.assert_array_equal(ours[index].numpy(), model.predict(episodes.query[index].double().numpy()))


def test_prototype_heads_are_the_nearest_cosine_centroid():
    episodes = cluster_episodes(8)
    heads = prototype_heads(episodes.support, episodes.support_labels, episodes.n_way)
    centroids = episodes.support.reshape(8, 5, 3, -1).mean(2)  # labels are grouped: label j's K items are contiguous
    expected = F.cosine_similarity(episodes.query.unsqueeze(2), centroids.unsqueeze(1), dim=-1).argmax(-1)
    assert torch.equal(head_logits(heads, episodes.query).argmax(-1), expected)


def test_every_row_is_scored_on_the_same_episodes_with_paired_differences(tmp_path):
    episodes = cluster_episodes(40)
    random_heads = lambda support, labels, n_way: torch.randn(support.shape[0], n_way, support.shape[-1] + 1,  # noqa: E731
                                                              generator=torch.Generator().manual_seed(1))
    table = evaluate_episodes(episodes, {"random": random_heads}, kinds={"random": "ablation"}, output_dir=tmp_path)
    assert [row.name for row in table.rows] == ["logistic_regression", "nearest_centroid", "random", "query_label_bound"]
    reference = np.array(table["logistic_regression"].values["accuracy"])
    for name in ("nearest_centroid", "random"):
        accuracy = np.array(table[name].values["accuracy"])
        assert len(accuracy) == 40
        np.testing.assert_allclose(table[name].values["diff_vs_logistic_regression"], accuracy - reference, atol=1e-6)
    expected = episode_accuracy(prototype_heads(episodes.support, episodes.support_labels, 5), episodes)
    np.testing.assert_allclose(table["nearest_centroid"].values["accuracy"], expected.numpy(), atol=1e-6)
    assert 0.5 < reference.mean() < 0.99, "the synthetic tasks are learnable but not trivial"
    assert abs(np.mean(table["random"].values["accuracy"]) - 0.2) < 0.08, "random heads are at chance"
    assert table["query_label_bound"].kind == "bound"
    assert np.mean(table["query_label_bound"].values["accuracy"]) >= reference.mean() - 0.01
    mean, half = mean_ci95(reference)
    assert half == pytest.approx(1.959963984540054 * reference.std(ddof=1) / math.sqrt(40))
    assert table["logistic_regression"].ci95("accuracy") == pytest.approx(half)
    markdown = (tmp_path / "results.md").read_text()
    assert f"{mean:.4f} ± {half:.4f}" in markdown and "95% CI over episodes" in markdown and "query_label_bound †" in markdown
    assert ResultsTable.from_json(tmp_path / "results.json").interval == "ci95"
    assert (tmp_path / "results.png").stat().st_size > 0


def test_draws_are_scored_by_their_mean_accuracy_and_oracles_are_bounds_that_see_the_query_labels(tmp_path):
    episodes = cluster_episodes(30)
    prototype = lambda support, labels, n_way: prototype_heads(support, labels, n_way)  # noqa: E731
    noisy = lambda support, labels, n_way: torch.stack(  # noqa: E731
        [prototype(support, labels, n_way), torch.randn(support.shape[0], n_way, support.shape[-1] + 1, generator=torch.Generator().manual_seed(2))], 1)
    seen = []

    def query_oracle(batch):  # logistic regression on support + query with their labels: query_label_bound's heads
        seen.append(len(batch))
        return query_label_bound_heads(batch)

    table = evaluate_episodes(episodes, {"two_draws": noisy}, oracle_fitters={"oracle": query_oracle},
                              descriptions={"oracle": "logistic regression with the query labels"}, output_dir=tmp_path)
    assert [row.name for row in table.rows] == ["logistic_regression", "nearest_centroid", "two_draws", "oracle", "query_label_bound"]
    draws = noisy(episodes.support, episodes.support_labels, 5)
    expected = (episode_accuracy(draws[:, 0], episodes) + episode_accuracy(draws[:, 1], episodes)) / 2
    np.testing.assert_allclose(table["two_draws"].values["accuracy"], expected.numpy(), atol=1e-6)
    assert table["two_draws"].kind == "method"
    oracle = table["oracle"]
    assert oracle.kind == "bound" and "uses test labels" in oracle.description and seen == [2, 30], "warm-up on two episodes, then all"
    np.testing.assert_allclose(oracle.values["accuracy"], table["query_label_bound"].values["accuracy"], atol=1e-6)
    reference = np.array(table["logistic_regression"].values["accuracy"])
    np.testing.assert_allclose(oracle.values["diff_vs_logistic_regression"], np.array(oracle.values["accuracy"]) - reference, atol=1e-6)
    assert "| oracle † |" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="has the name of another row"):
        evaluate_episodes(episodes, {"x": prototype}, oracle_fitters={"x": query_oracle})


def test_adam_fitter_fine_tunes_each_episode_from_its_start_like_one_adam_per_task():
    episodes = cluster_episodes(6)
    support, labels = episodes.support.float(), episodes.support_labels
    start = lambda support, labels, n_way: prototype_heads(support, labels, n_way).float()  # noqa: E731
    assert torch.equal(adam_fitter(0, start=start)(support, labels, 5), start(support, labels, 5))
    random_start = adam_fitter(0, seed=3)(support, labels, 5)
    assert random_start.shape == (6, 5, 9) and random_start.std() == pytest.approx(0.01, rel=0.3)
    tuned = adam_fitter(4, start=start, lr=0.01)(support, labels, 5)
    for task in range(6):  # one torch Adam per task, 4 steps on its own support
        head = start(support, labels, 5)[task].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([head], lr=0.01)
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(head_logits(head[None], support[task][None])[0], labels[task]).backward()
            optimizer.step()
        torch.testing.assert_close(tuned[task], head.detach(), rtol=0, atol=adam_delta_atol(0.01, 4, support.shape[1]))
    with pytest.raises(ValueError, match="steps must be >= 0"):
        adam_fitter(-1)


def test_bad_inputs_name_the_fix():
    episodes = cluster_episodes(4)
    with pytest.raises(ValueError, match="carry no features"):
        evaluate_episodes(type(episodes)(episodes.support_index, episodes.query_index, episodes.classes), {})
    wrong = lambda support, labels, n_way: torch.zeros(support.shape[0], n_way, 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"returned heads of shape \(4, 5, 3\)"):
        evaluate_episodes(episodes, {"wrong": wrong}, include_baselines=False, include_bound=False)
    with pytest.raises(ValueError, match="interval must be one of"):
        ResultsTable([], interval="iqr")


def test_the_docs_tables_combine_runs_per_setting_and_split(tmp_path):
    import fewshot_tables  # studies/ is on pytest's pythonpath

    accuracies = []
    for seed in (0, 1):
        episodes = cluster_episodes(20, seed=seed)
        table = evaluate_episodes(episodes, {}, output_dir=tmp_path / f"run{seed}" / "5way-3shot" / "results-test")
        accuracies.append(table["nearest_centroid"].mean("accuracy"))
    text = fewshot_tables.main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--title", "Clusters", "--json", str(tmp_path / "t.json")])
    assert "### Clusters: 5way-3shot, meta-test" in text
    row = next(line for line in text.splitlines() if line.startswith("| nearest_centroid |"))
    assert f"{100 * np.mean(accuracies):.1f} ± {100 * np.std(accuracies, ddof=1):.1f}" in row
    assert "query_label_bound †" in text
    assert len(json.loads((tmp_path / "t.json").read_text())["tables"]["5way-3shot/test"]) == 2
