"""The few-shot head benchmark shared by every task-conditioned generator: the same fixed episodes for
every row, accuracy as mean ± 95% CI over episodes, the paired difference to logistic regression, and
the latency of producing one task's head, measured in the same run.

A *head fitter* turns a batch of support sets into heads: ``fitter(support (E, N·K, d), labels (E, N·K),
n_way) -> (E, N, d+1)`` (weights, then the bias column), or ``(E, S, N, d+1)``: ``S`` heads per task, scored
by their mean accuracy (the expected accuracy of one draw of a sampler). An *oracle fitter* receives the whole
:class:`~ocd_hf.episodes.Episode` batch, query labels included (``oracle(episodes) -> (E, [S,] N, d+1)``): its
rows are always bounds (†), for protocols that select with the test labels. The strongest simple baselines are here
(logistic regression on the support, as SetFit's default head; nearest class centroid with cosine
prototypes) and the bound that reads the query labels (marked †, never a method's accuracy).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .checks import check_class_labels, check_finite_inputs, check_writable_dir
from .episodes import Episode
from .results import ResultRow, ResultsTable
from .task_heads import fit_task_heads

HeadFitter = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
OracleFitter = Callable[[Episode], torch.Tensor]
REFERENCE = "logistic_regression"
Z_95 = 1.959963984540054


def check_episodes(episodes: Episode) -> None:
    """Refuse episodes without features or with a shape the fitters cannot read."""
    if episodes.support is None or episodes.query is None:
        raise ValueError("The episodes carry no features: sample them with a column (sampler.sample(E, column='embedding')).")
    if episodes.support.dim() != 3:
        raise ValueError(
            f"Heads are fitted on embedding vectors: support must be (E, N·K, d), got {tuple(episodes.support.shape)}. "
            "Embed the items first (ocd_hf.episodes.embed_items)."
        )


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A short SHA-256 of every tensor in ``encoder``'s state dict (names and values), to refuse another encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_encoder(config: Any, encoder: nn.Module | None = None, *, fingerprint: str | None = None, embedding_dim: int | None = None) -> None:
    """Refuse an encoder (or its ``fingerprint`` / ``embedding_dim``) other than the one a head generator was trained for.

    ``config`` is the generator's config (``embedding_dim``, ``encoder_id``, ``encoder_revision``, ``encoder_fingerprint``).
    The embedding size is read from ``encoder.get_sentence_embedding_dimension()`` when it has one
    (sentence-transformers); the fingerprint is :func:`encoder_fingerprint`.
    """
    if encoder is not None:
        fingerprint = fingerprint or encoder_fingerprint(encoder)
        if embedding_dim is None and hasattr(encoder, "get_sentence_embedding_dimension"):
            embedding_dim = encoder.get_sentence_embedding_dimension()
    if embedding_dim is not None and embedding_dim != config.embedding_dim:
        raise ValueError(
            f"The encoder makes {embedding_dim}-d embeddings but this generator makes heads for {config.embedding_dim}-d "
            f"embeddings of {config.encoder_id!r}: use that encoder, or train a generator on this encoder's embeddings."
        )
    if fingerprint is not None and config.encoder_fingerprint is not None and fingerprint != config.encoder_fingerprint:
        raise ValueError(
            f"The encoder's weights (fingerprint {fingerprint}) differ from those the generator was trained with "
            f"({config.encoder_fingerprint}): its embeddings, and so the generated heads, would not match. Load "
            f"{config.encoder_id!r} at revision {config.encoder_revision!r}, or train a generator on this encoder's embeddings."
        )


def check_support(
    support: torch.Tensor, labels: torch.Tensor, embedding_dim: int, max_num_classes: int, *, config_name: str = "its config"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(B, n, d)`` support, ``(B, n)`` labels and ``N`` from one task's ``(n, d)``/``(n,)`` or a batch's; refuses bad input.

    The checks every task-conditioned head generator's ``generate_heads`` makes; ``config_name`` names the
    generator's config class in the advice to train one for more classes."""
    support, labels = torch.as_tensor(support), torch.as_tensor(labels)
    if support.dim() == 2 and labels.dim() == 1:
        support, labels = support.unsqueeze(0), labels.unsqueeze(0)
    if support.dim() != 3 or labels.shape != support.shape[:2]:
        raise ValueError(
            f"support_embeddings must be (N·K, d) or (B, N·K, d) with support_labels (N·K,) or (B, N·K); got "
            f"{tuple(support.shape)} and {tuple(labels.shape)}."
        )
    if support.shape[-1] != embedding_dim:
        raise ValueError(
            f"The support embeddings have size {support.shape[-1]} but this generator was trained on {embedding_dim}-d embeddings: "
            "embed the support with the encoder named in config.encoder_id."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"support_labels must be integer class indices, got {labels.dtype}.")
    if support.shape[1] == 0:
        raise ValueError("support_labels must be 0..N-1 over a non-empty support set; got no items.")
    check_class_labels(labels, None, name="support_labels")  # negative labels (-100 included), by position in the flattened batch
    check_finite_inputs({"support_embeddings": support.flatten(0, 1)})
    num_classes = int(labels.max()) + 1
    present = F.one_hot(labels.long(), num_classes).sum(1) > 0  # (B, N)
    if not bool(present.all()):
        task, label = (~present).nonzero()[0].tolist()
        raise ValueError(
            f"support_labels must use every label 0..N-1 (N = {num_classes}, the largest label + 1), each with K >= 1 "
            f"support items; task {task} has no item labelled {label}. Relabel the classes as 0..N-1."
        )
    if not 2 <= num_classes <= max_num_classes:
        raise ValueError(
            f"This generator makes heads for 2..{max_num_classes} classes; the support has N = {num_classes}. Split the task "
            f"into tasks of at most {max_num_classes} classes, or train a generator with {config_name}(max_num_classes={num_classes})."
        )
    return support, labels.long(), num_classes


def head_logits(heads: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Logits ``(E, M, N)`` of heads ``(E, N, d+1)`` on features ``(E, M, d)``."""
    return torch.einsum("emd,end->emn", features.to(heads.dtype), heads[..., :-1]) + heads[..., -1].unsqueeze(1)


def episode_accuracy(heads: torch.Tensor, episodes: Episode) -> torch.Tensor:
    """Query accuracy ``(E,)`` of one head per episode ``(E, N, d+1)``, or the mean accuracy of ``S`` heads per
    episode ``(E, S, N, d+1)``."""
    if heads.dim() == 4:
        return torch.stack([episode_accuracy(heads[:, draw], episodes) for draw in range(heads.shape[1])], 1).mean(1)
    predictions = head_logits(heads, episodes.query).argmax(-1)
    return (predictions == episodes.query_labels.to(predictions.device)).float().mean(-1)


def prototype_heads(support: torch.Tensor, labels: torch.Tensor, n_way: int, scale: float = 10.0) -> torch.Tensor:
    """Nearest class centroid with cosine similarity, as a linear head: rows are the normalised class means
    (``scale`` sets the softmax temperature, not the predictions); inputs are compared after normalisation
    only when they are (MiniLM embeddings are)."""
    one_hot = F.one_hot(labels.long(), n_way).to(support.dtype)  # (E, N·K, N)
    centroids = torch.einsum("ekn,ekd->end", one_hot, support) / one_hot.sum(1).unsqueeze(-1)
    weights = scale * F.normalize(centroids, dim=-1)
    return torch.cat([weights, torch.zeros(*weights.shape[:2], 1, dtype=weights.dtype)], dim=-1)


def logistic_regression_heads(support: torch.Tensor, labels: torch.Tensor, n_way: int, C: float = 1.0, max_iter: int = 1000) -> torch.Tensor:
    """scikit-learn's ``LogisticRegression`` (SetFit's default head) fitted on each support set, as ``(E, N, d+1)`` heads."""
    from sklearn.linear_model import LogisticRegression

    heads = torch.zeros(support.shape[0], n_way, support.shape[-1] + 1, dtype=torch.float64)
    for index, (x, y) in enumerate(zip(support.double().numpy(), labels.numpy())):
        model = LogisticRegression(C=C, max_iter=max_iter).fit(x, y)
        if n_way == 2:  # one decision function: classes get -f/2 and +f/2
            weights = np.concatenate([-model.coef_ / 2, model.coef_ / 2])
            bias = np.concatenate([-model.intercept_ / 2, model.intercept_ / 2])
        else:
            weights, bias = model.coef_, model.intercept_
        heads[index] = torch.from_numpy(np.concatenate([weights, bias[:, None]], axis=1))
    return heads


def adam_fitter(steps: int, *, start: HeadFitter | None = None, lr: float = 0.005, init_std: float = 0.01, seed: int = 0) -> HeadFitter:
    """A head fitter that runs ``steps`` Adam steps on each support set, all episodes at once (one Adam per
    task, :func:`ocd_hf.task_heads.fit_task_heads`), from ``start``'s heads (e.g. a generator's, or logistic
    regression's) or, by default, from a seeded Gaussian initialisation ``N(0, init_std²)``.

    ``steps=0`` returns the starting heads: with ``start=None`` a random head (chance accuracy), the
    control row for "fine-tuning from a generated head" vs "from random init".
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")

    def fit(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        support = support.float()
        if start is None:
            shape = (support.shape[0], n_way, support.shape[-1] + 1)
            theta0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=support.dtype) * init_std
        else:
            theta0 = start(support, labels, n_way).to(support.dtype)
        if steps == 0:
            return theta0
        return fit_task_heads(support, labels.long(), n_way, steps=steps, lr=lr, num_targets=1, theta0=theta0).targets[:, -1]

    return fit


def query_label_bound_heads(episodes: Episode) -> torch.Tensor:
    """† Logistic regression fitted on the support AND the query items with their labels: an upper bound
    that reads the test labels, never a method's accuracy."""
    features = torch.cat([episodes.support, episodes.query], dim=1)
    labels = torch.cat([episodes.support_labels, episodes.query_labels], dim=1)
    return logistic_regression_heads(features, labels, episodes.n_way)


def mean_ci95(values: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(Z_95 * values.std(ddof=1) / math.sqrt(values.size))


def blas_threads(threads: int | None) -> contextlib.AbstractContextManager:
    """Limit the BLAS libraries numpy and scikit-learn call to ``threads`` (threadpoolctl, which scikit-learn
    installs; without it, or with ``None``, nothing changes)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads) if threads else contextlib.nullcontext()


def support_only(fitter: HeadFitter) -> OracleFitter:
    """``fitter`` called on the episodes' support sets only (the query items never reach it)."""
    return lambda episodes: fitter(episodes.support, episodes.support_labels, episodes.n_way)


def _timed(fit: OracleFitter, episodes: Episode, threads: int | None) -> tuple[torch.Tensor, float]:
    """The heads of all episodes in one call of ``fit(episodes)`` and its wall time, after an untimed warm-up call
    on two episodes (lazy imports, allocator and kernel caches); torch and the BLAS scikit-learn uses on ``threads`` threads."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with blas_threads(threads):
            fit(episodes[:2])
            start = time.perf_counter()
            heads = fit(episodes)
            return heads, time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def evaluate_episodes(
    episodes: Episode,
    fitters: Mapping[str, HeadFitter],
    *,
    kinds: Mapping[str, str] | None = None,
    descriptions: Mapping[str, str] | None = None,
    include_baselines: bool = True,
    include_bound: bool = True,
    oracle_fitters: Mapping[str, OracleFitter] | None = None,
    output_dir: str | os.PathLike | None = None,
    title: str = "Few-shot heads",
    timing_threads: int | None = 1,
) -> ResultsTable:
    """Query accuracy of every fitter's heads on the same ``episodes``, next to the baselines and the † bound.

    Each row holds the per-episode accuracies (``accuracy``), their paired differences to logistic
    regression (``diff_vs_logistic_regression``), and the wall time per task of producing the heads
    for all episodes in one call, after a warm-up call on two of them (``ms_per_task``, on ``timing_threads``
    torch and BLAS threads; ``None`` keeps the caller's setting). The table reports
    mean ± 95% CI over episodes. ``kinds`` marks a row ``"method"`` (default for ``fitters``),
    ``"baseline"`` or ``"ablation"``. A fitter returning ``S`` heads per task ``(E, S, N, d+1)`` is scored by their
    mean accuracy per episode.

    ``oracle_fitters`` (``oracle(episodes) -> (E, [S,] N, d+1)``) see the query items and their labels (e.g. the
    paper protocol that keeps the draws with the best query accuracy): their rows are scored and timed like the
    others but always of kind ``"bound"`` (marked †), their descriptions saying that they use the test labels.
    """
    check_episodes(episodes)
    if output_dir is not None:
        check_writable_dir(output_dir)
    rows: dict[str, tuple[str, str, OracleFitter]] = {}
    if include_baselines:
        rows[REFERENCE] = ("baseline", "logistic regression on the support (SetFit's default head)", support_only(logistic_regression_heads))
        rows["nearest_centroid"] = ("baseline", "nearest class centroid, cosine prototypes", support_only(prototype_heads))
    for name, fitter in fitters.items():
        rows[name] = ((kinds or {}).get(name, "method"), (descriptions or {}).get(name, name), support_only(fitter))
    for name, oracle in (oracle_fitters or {}).items():
        if name in rows or name == "query_label_bound":
            raise ValueError(f"Oracle fitter {name!r} has the name of another row; give it its own name.")
        description = (descriptions or {}).get(name, name)
        rows[name] = ("bound", description if "test labels" in description else f"{description} (uses test labels)", oracle)
    accuracies, seconds = {}, {}
    for name, (_, _, fit) in rows.items():
        heads, seconds[name] = _timed(fit, episodes, timing_threads)
        head_shape = (episodes.n_way, episodes.support.shape[-1] + 1)
        if heads.dim() not in (3, 4) or heads.shape[0] != len(episodes) or tuple(heads.shape[-2:]) != head_shape:
            raise ValueError(
                f"Head fitter {name!r} returned heads of shape {tuple(heads.shape)}; expected "
                f"(episodes, n_way, d + 1) = {(len(episodes), *head_shape)} or (episodes, draws, n_way, d + 1)."
            )
        accuracies[name] = episode_accuracy(heads, episodes)
    reference = accuracies.get(REFERENCE)
    table_rows = []
    for name, (kind, description, _) in rows.items():
        values = {"accuracy": accuracies[name].tolist(), "ms_per_task": [1e3 * seconds[name] / len(episodes)]}
        if reference is not None and name != REFERENCE:
            values["diff_vs_logistic_regression"] = (accuracies[name] - reference).tolist()
        table_rows.append(ResultRow(name, kind, description, values))
    if include_bound:
        bound = episode_accuracy(query_label_bound_heads(episodes), episodes)
        description = "logistic regression on support + query WITH the query labels (uses test labels)"
        table_rows.append(ResultRow("query_label_bound", "bound", description, {"accuracy": bound.tolist()}))
    metadata = {
        "task": "classification", "title": title, "num_episodes": len(episodes), "n_way": episodes.n_way,
        "k_shot": episodes.k_shot, "q_queries": episodes.q_queries, "embedding_dim": int(episodes.support.shape[-1]),
        "timing_threads": timing_threads or torch.get_num_threads(),
    }
    table = ResultsTable(table_rows, metadata, runs_label="episodes", interval="ci95")
    if output_dir is not None:
        table.save(output_dir)
    return table
