"""Image sources of recipes/fewshot_mcdi.py (``--source glyphs``): characters rendered at 28×28 from the
fonts matplotlib ships (Omniglot-like, :func:`ocd_hf.sources.render_glyphs`), and Fashion-MNIST as a
cross-domain test; the generated object is the head ``fc3`` of the image recipes' LeNet-5.

There is no pretrained image encoder offline, so the protocol is Classifier-Baseline's: the glyph
classes are split into meta-train / meta-val / meta-test (disjoint, ``class_split`` with the recipe's
``--split-fractions`` and ``--seed``) -> LeNet-5 is trained as an ordinary classifier on the images of
the META-TRAIN classes only (``train_lenet`` of recipes/lenet_ocd.py; a seeded share of each class's
images is held out to score it) -> frozen -> every item of every split is embedded by what its ``fc3``
reads, ``ReLU(fc2(x))`` (84-d), so a generated ``(N, 85)`` head is a drop-in ``fc3`` for the new task.
Fashion-MNIST (all 10 classes of its test split, never seen by the encoder) becomes the split
``fashion_mnist``. The encoder checkpoint and the embeddings are cached under ``--output-dir``, keyed by
everything that determines them.

    apt-get install -y dataset-fashion-mnist       # the cross-domain split's data (or --cross-domain none)
    python recipes/fewshot_mcdi.py --source glyphs --feature-check   # the protocol facts and the feature sanity check below
    python recipes/fewshot_mcdi.py --source glyphs                   # the Mc-Di benchmark on these splits

With ``--feature-check`` the recipe prints the protocol facts (classes per split, items per class, the encoder's
held-out accuracy) and the nearest-centroid and logistic-regression accuracy of 5-way 1- and 5-shot
episodes of meta-val and Fashion-MNIST (the episodes ``fewshot_mcdi.py`` scores). The encoder's defaults
were chosen on meta-val with it (600 episodes, nearest centroid 1-/5-shot): 400 drawers per character (100: 0.867/0.938, 200: 0.888/0.947, 400: 0.898/0.952),
Adam lr 3e-3 (1e-3 needed 40 epochs for less), 15 epochs (10: 0.894/0.951, 20: 0.898/0.951); about a
minute on 2 busy cores (render ~27 s, training ~33 s, embedding ~2 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the HF libraries are imported in functions: the recipe may set HF_HUB_OFFLINE first
    import numpy as np
    import torch
    from datasets import Dataset

    from ocd_hf import LeNet5ForImageClassification, TaskDistribution
    from ocd_hf.episodes import MetaSplit

IMAGE_SOURCES = ("glyphs",)
CROSS_DOMAIN = ("fashion_mnist", "none")
FEATURES = "ReLU(fc2(x)), the input of fc3"


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--source glyphs``: rendering, the encoder's training, the cross-domain split."""
    group = parser.add_argument_group("image sources (--source glyphs)")
    group.add_argument("--glyph-instances", type=int, default=400, help="rendered images (drawers) per character")
    group.add_argument("--cross-domain", choices=CROSS_DOMAIN, default="fashion_mnist", help="extra test split embedded by the glyph encoder")
    group.add_argument("--fashion-mnist-dir", default=None, help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    group.add_argument("--encoder-epochs", type=int, default=15, help="LeNet-5 epochs on the meta-train glyph classes (chosen on meta-val)")
    group.add_argument("--encoder-batch-size", type=int, default=128)
    group.add_argument("--encoder-lr", type=float, default=3e-3, help="Adam lr of the encoder's training")
    group.add_argument("--encoder-holdout", type=float, default=0.1, help="share of each meta-train class's images held out to score the encoder")


def encoder_id_of(args: argparse.Namespace, glyphs: Dataset) -> str:
    """What determines the glyph encoder: the images (their dataset fingerprint), the class split and the training."""
    fractions = "/".join(f"{f:g}" for f in args.split_fractions)
    return (
        f"lenet5-glyphs[{FEATURES}] glyphs={glyphs._fingerprint} instances={args.glyph_instances} "
        f"train-classes=class_split({fractions}, seed={args.seed}) holdout={args.encoder_holdout:g} epochs={args.encoder_epochs} "
        f"batch={args.encoder_batch_size} lr={args.encoder_lr:g} seed={args.seed}"
    )


def holdout_rows(distribution: TaskDistribution, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, held_out)`` rows of ``distribution``'s classes: a seeded ``share`` of each class's rows held out."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    fit, held = [], []
    for class_id in distribution.classes:
        rows = rng.permutation(distribution.rows_of(int(class_id)))
        count = int(round(share * len(rows)))
        held.append(rows[:count])
        fit.append(rows[count:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def classifier_rows(items: Dataset, rows: np.ndarray, classes: np.ndarray) -> Dataset:
    """Rows ``rows`` of ``items`` as LeNet-5 inputs: ``pixel_values`` and ``label`` renumbered ``0..len(classes)-1``."""
    import numpy as np
    from lenet_ocd import take_rows, with_pixel_values

    subset = take_rows(items.select_columns(["image", "label"]), rows)
    local = np.searchsorted(classes, np.asarray(subset["label"]))
    subset = subset.remove_columns("label").add_column("label", local.astype(np.int64))
    return with_pixel_values(subset, num_channels=1)


def penultimate_features(model: LeNet5ForImageClassification, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, 84)``: what ``model.fc3`` reads, ``ReLU(fc2(x))`` (captured by a hook, so it is the model's own forward)."""
    import torch

    captured = []
    handle = model.fc3.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values)
    finally:
        handle.remove()
    return captured[0]


def train_glyph_encoder(
    items: Dataset, train: TaskDistribution, args: argparse.Namespace, directory: Path, log: Any = print
) -> tuple[LeNet5ForImageClassification, dict[str, Any]]:
    """LeNet-5 trained on the images of ``train``'s classes only (less a held-out share), or loaded from ``directory``.

    Returns the frozen model (eval mode) and what it was trained on: its classes (ids and names, also its
    ``config.id2label``), the numbers of fitted and held-out images, and its held-out accuracy.
    """
    import numpy as np
    import torch
    from lenet_ocd import LeNetTraining, build_lenet, train_lenet

    from ocd_hf import LeNet5ForImageClassification

    classes = np.asarray(train.classes)
    names = [train.class_names[int(c)] for c in classes]
    fit_rows, held_rows = holdout_rows(train, args.encoder_holdout, args.seed)
    settings = LeNetTraining(epochs=args.encoder_epochs, batch_size=args.encoder_batch_size, lr=args.encoder_lr)
    if (directory / "config.json").is_file():
        model = LeNet5ForImageClassification.from_pretrained(directory).eval()
        if list(model.config.id2label.values()) != names:
            raise ValueError(f"The cached glyph encoder in {directory} was trained on other classes; delete it to retrain.")
        log(f"glyph encoder: loaded {directory} (delete it to retrain)")
    else:
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            model = build_lenet(names, (28, 28))
        log(f"glyph encoder: training LeNet-5 on {len(fit_rows)} images of the {len(classes)} meta-train classes for {settings.epochs} epochs")
        train_lenet(model, classifier_rows(items, fit_rows, classes), settings, args.seed, log=lambda line: log(f"  {line}"))
        model.save_pretrained(directory)
    accuracy = None
    if len(held_rows):
        held = classifier_rows(items, held_rows, classes).with_format("torch", columns=["pixel_values", "label"])[:]
        with torch.no_grad():
            accuracy = float((model(pixel_values=held["pixel_values"]).logits.argmax(-1) == held["label"]).float().mean())
    info = {
        "architecture": "LeNet-5 (ocd_hf.LeNet5ForImageClassification)", "features": FEATURES, "checkpoint": str(directory),
        "trained_on_classes": classes.tolist(), "trained_on_names": names, "fit_images": len(fit_rows), "held_out_images": len(held_rows),
        "held_out_accuracy": accuracy, "training": {**asdict(settings), "seed": args.seed, "optimizer": "adam"},
    }
    return model, info


def embed_images(items: Dataset, model: LeNet5ForImageClassification, encoder_id: str, cache_dir: Path) -> Dataset:
    """``items`` with an ``embedding`` column: :func:`penultimate_features` of every image (batched, cached)."""
    from data import pixel_values_from_arrays

    from ocd_hf import embed_items

    encode = lambda images: penultimate_features(model, pixel_values_from_arrays(list(images), num_channels=1))  # noqa: E731
    return embed_items(items, encode, "image", batch_size=1024, cache_dir=cache_dir, encoder_id=encoder_id)


def image_splits(args: argparse.Namespace, log: Any = print) -> tuple[MetaSplit, str, str]:
    """``(splits, encoder_id, encoder_fingerprint)`` of ``--source glyphs``: meta-train / val / test glyph classes,
    and ``fashion_mnist`` (unless ``--cross-domain none``), every item with an ``embedding`` by the glyph encoder.

    ``splits.record`` says how they were made: the glyph class split (fractions, seed), the sources'
    metadata, the encoder (what it was trained on, its held-out accuracy, ``encoder_id`` and fingerprint),
    items per class and the seconds each stage took.
    """
    import numpy as np

    from ocd_hf import TaskDistribution
    from ocd_hf.episodes import MetaSplit
    from ocd_hf.methods.mcdi import encoder_fingerprint
    from ocd_hf.sources import load_fashion_mnist_items, render_glyphs, source_metadata

    if args.source not in IMAGE_SOURCES:
        raise ValueError(f"image_splits: --source {args.source!r} is not an image source ({', '.join(IMAGE_SOURCES)}).")
    needed = max(args.shots) + args.queries
    if args.glyph_instances < needed:
        raise ValueError(f"--glyph-instances {args.glyph_instances} is too few for {max(args.shots)}-shot episodes with {args.queries} queries ({needed}).")
    output_dir, timings = Path(args.output_dir), {}
    tick = time.perf_counter()
    glyphs = render_glyphs(instances_per_character=args.glyph_instances, seed=args.seed)
    timings["render"] = time.perf_counter() - tick
    glyph_split = TaskDistribution(glyphs, name="glyphs").class_split(tuple(args.split_fractions), seed=args.seed)

    tick = time.perf_counter()
    encoder_id = encoder_id_of(args, glyphs)
    key = hashlib.sha256(encoder_id.encode()).hexdigest()[:16]
    encoder, encoder_info = train_glyph_encoder(glyphs, glyph_split["train"], args, output_dir / "glyph-encoders" / key, log=log)
    fingerprint = encoder_fingerprint(encoder)
    timings["encoder"] = time.perf_counter() - tick

    tick = time.perf_counter()
    cache, embedding_id = output_dir / "embeddings", f"{encoder_id} fingerprint={fingerprint}"
    sources = {"glyphs": embed_images(glyphs, encoder, embedding_id, cache)}
    metadata = {"glyphs": source_metadata(glyphs)}
    if args.cross_domain == "fashion_mnist":
        fashion = load_fashion_mnist_items(*([args.fashion_mnist_dir] if args.fashion_mnist_dir else []), split="test")
        sources["fashion_mnist"], metadata["fashion_mnist"] = embed_images(fashion, encoder, embedding_id, cache), source_metadata(fashion)
    timings["embed"] = time.perf_counter() - tick

    combined = TaskDistribution.from_datasets(sources)  # class ids: glyph labels as they are, Fashion-MNIST's after them
    assigned = {name: part.classes.tolist() for name, part in glyph_split.items()}
    if "fashion_mnist" in sources:
        assigned["fashion_mnist"] = [c for c, name in combined.class_names.items() if name.startswith("fashion_mnist/")]
    parts = dict(combined.class_split(assigned).items())
    record = {
        "level": "class",
        "method": "glyph classes split by fractions (class_split); fashion_mnist: every class of the Fashion-MNIST test split, "
        "a cross-domain test split the encoder never saw",
        "fractions": glyph_split.record["fractions"], "seed": args.seed,
        "classes": {name: part.classes.tolist() for name, part in parts.items()},
        "class_names": {name: [part.class_names[int(c)] for c in part.classes] for name, part in parts.items()},
        "items_per_class": {name: [int(part.class_sizes.min()), int(part.class_sizes.max())] for name, part in parts.items()},
        "sources": metadata,
        "encoder": {"id": encoder_id, "fingerprint": fingerprint, **encoder_info},
        "timings_seconds": timings,
    }
    splits = MetaSplit(parts, record)
    for name, part in parts.items():
        low, high = int(part.class_sizes.min()), int(part.class_sizes.max())
        log(f"{name}: {part.num_classes} classes, {low if low == high else f'{low}-{high}'} items per class")
    accuracy = encoder_info["held_out_accuracy"]
    log(
        f"glyph encoder {fingerprint}: trained on the {len(encoder_info['trained_on_classes'])} meta-train classes only "
        f"({encoder_info['fit_images']} images); accuracy on {encoder_info['held_out_images']} held-out images of those classes: "
        + (f"{accuracy:.3f}" if accuracy is not None else "n/a")
        + f"; embeddings {int(np.asarray(combined.features('embedding')).shape[1])}-d ({FEATURES})"
    )
    log("seconds: " + ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in timings.items()))
    return splits, encoder_id, fingerprint


def feature_check(splits: MetaSplit, names: list[str], args: Any, include_bound: bool = False) -> dict[str, Any]:
    """Nearest-centroid and logistic-regression accuracy (mean, 95% CI) of each split in ``names`` and each of
    ``args.shots``, on the episodes ``fewshot_mcdi.run_shot`` scores (``MetaSplit.benchmark_episodes``)."""
    from ocd_hf import evaluate_episodes

    results: dict[str, Any] = {}
    for k in args.shots:
        episodes = splits.benchmark_episodes(args.n_way, k, args.queries, args.episodes, column="embedding")
        for name in names:
            table = evaluate_episodes(episodes[name], {}, include_bound=include_bound, title=f"{args.n_way}-way {k}-shot, {name}")
            results[f"{name} {k}shot"] = {row.name: (row.mean("accuracy"), row.ci95("accuracy")) for row in table.rows}
    return results


def run_feature_check(args: argparse.Namespace) -> dict[str, Any]:
    """``fewshot_mcdi.py --source glyphs --feature-check``: print the protocol facts and the feature sanity check
    (meta-val and the cross-domain split; meta-test is read once, for the final table) and save them."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS and scikit-learn's OpenMP: threadpoolctl limits loaded libraries only)
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # oversubscribed, OpenBLAS made the logistic regressions 10-100× slower on a busy machine
    started = time.perf_counter()
    splits, _, _ = image_splits(args)
    print(f"images ready in {time.perf_counter() - started:.1f} s")
    names = [name for name in splits if name not in ("train", "test")]  # meta-test is read once, for the final table
    results = feature_check(splits, names, args, include_bound=True)
    print(f"\n{args.n_way}-way, {args.queries} queries per class, {args.episodes} episodes: accuracy (mean ± 95% CI)")
    for setting, rows in results.items():
        print(f"  {setting:>20}: " + ", ".join(f"{row} {mean:.3f} ± {ci:.3f}" for row, (mean, ci) in rows.items()))
    summary = {"split": splits.record, "feature_check": results}
    output = Path(args.output_dir) / "glyph-protocol.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"\nsaved to {output}")
    return summary
