"""OCD on ``fc2`` of a LeNet-5 image classifier, end to end: the OCD paper's Table 1 setting.

Carve a seeded validation split out of the training split -> train LeNet-5 on the rest (Adam, a
plain seeded torch loop) -> harvest the per-sample deltas of ``fc2`` (120 -> 84) on training images
-> train the hypernetwork -> evaluate on the test split (or, to choose settings, the validation
split) -> save. The results table is saved as JSON, markdown and PNG.

    accelerate launch recipes/lenet_ocd.py            # or: python recipes/lenet_ocd.py
    python recipes/lenet_ocd.py --eval-split validation --harvest-lr 2e-3

Default, offline: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``. ``--dataset``
takes any Hub id or local path of square images of one size (grey or colour).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ocd_options import add_ocd_arguments, cross_fit_folds, hypernetwork_overrides, threads_per_process

if TYPE_CHECKING:  # the HF libraries are imported in functions: main() may set HF_HUB_OFFLINE first
    import numpy as np
    from datasets import Dataset

    from ocd_hf import LeNet5ForImageClassification


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=None, help="Hub id or local path (default: Fashion-MNIST from the Debian package)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--target-module", default="fc2", help="Linear layer of LeNet-5 to generate (fc1, fc2 or fc3)")
    parser.add_argument("--output-dir", default="outputs/lenet_ocd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads per process (default: OMP_NUM_THREADS if set, else CPU cores / processes)")
    parser.add_argument(
        "--validation-size", type=int, default=5000, help="training images held out (seeded) as the validation split; LeNet never sees them"
    )
    parser.add_argument("--eval-split", choices=("validation", "test"), default="test", help="split that evaluate_ocd reads")
    parser.add_argument("--epochs", type=int, default=5, help="LeNet-5 training epochs")
    parser.add_argument("--classifier-batch-size", type=int, default=128)
    parser.add_argument("--classifier-lr", type=float, default=1e-3, help="Adam lr of LeNet-5 training")
    parser.add_argument("--harvest-size", type=int, default=5000, help="training images whose deltas are harvested")
    parser.add_argument("--harvest-lr", type=float, default=5e-4, help="Adam lr of the single-sample fine-tuning (paper: 5e-4)")
    parser.add_argument("--harvest-steps", type=int, default=3, help="Adam steps of the single-sample fine-tuning (paper: 3)")
    add_ocd_arguments(parser, fold_models="LeNets", generator="regression")  # chosen on validation: docs/when_ocd_helps.md
    parser.add_argument("--train-steps", type=int, default=1000, help="hypernetwork optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="hypernetwork training batch size")
    parser.add_argument("--eval-size", type=int, default=2000, help="images of --eval-split evaluated (a fixed random subset; all if larger)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=5, help="draws of the OCD ensemble")
    parser.add_argument("--sampling-seeds", type=int, default=3, help="sampling seeds of the hypernetwork")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class LeNetTraining:
    """Settings of :func:`train_lenet`: epochs over the training rows, Adam batch size and learning rate."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LeNetTraining":
        return cls(epochs=args.epochs, batch_size=args.classifier_batch_size, lr=args.classifier_lr)


def with_pixel_values(dataset: Dataset, num_channels: int) -> Dataset:
    """``dataset`` with its ``image`` column replaced by ``pixel_values``: standardised float32
    ``(channels, height, width)`` arrays, converted once (batched ``datasets.map``, kept in memory)."""
    import numpy as np
    from data import pixel_values_from_arrays
    from datasets import Array3D

    height, width = np.asarray(dataset[0]["image"]).shape[:2]
    features = dataset.features.copy()
    del features["image"]
    features["pixel_values"] = Array3D(shape=(num_channels, height, width), dtype="float32")
    converted = dataset.with_format("numpy").map(
        lambda batch: {"pixel_values": pixel_values_from_arrays(batch["image"], num_channels).numpy()},
        batched=True, batch_size=5000, features=features, remove_columns=["image"], desc="pixel values",
    )
    return converted.with_format(None)


def build_lenet(names: list[str], image_shape: tuple[int, ...]) -> LeNet5ForImageClassification:
    """A LeNet-5 with PyTorch's default random init for square images of ``image_shape`` ``(h, w[, c])`` and classes ``names``."""
    from ocd_hf import LeNet5Config, LeNet5ForImageClassification

    height, width = image_shape[:2]
    if height != width:
        raise ValueError(f"LeNet-5 takes square images; this dataset's are {height}×{width}.")
    config = LeNet5Config(
        num_channels=image_shape[2] if len(image_shape) == 3 else 1, image_size=int(height), id2label=dict(enumerate(names))
    )
    return LeNet5ForImageClassification(config)


def train_lenet(
    model: LeNet5ForImageClassification, train_dataset: Dataset, settings: LeNetTraining, seed: int, log: Callable[[str], None] = print
) -> LeNet5ForImageClassification:
    """Train every weight of ``model`` on the ``pixel_values``/``label`` rows of ``train_dataset``
    (cross-entropy, Adam, shuffled mini-batches from a generator seeded with ``seed``); returns it in eval mode.

    The rows are read into tensors once; call it again on another subset of rows (e.g. one
    cross-fitting fold) with a fresh model. Select that subset with :func:`take_rows`: reading a
    ``Dataset.select`` of 55 000 images costs ~20 s.
    """
    import torch

    missing = {"pixel_values", "label"} - set(train_dataset.column_names)
    if missing:
        raise ValueError(f"train_dataset lacks the columns {sorted(missing)} (it has {train_dataset.column_names}); see with_pixel_values.")
    rows = train_dataset.with_format("numpy", columns=["pixel_values", "label"])[:]
    pixels, labels = torch.from_numpy(rows["pixel_values"]), torch.from_numpy(rows["label"]).long()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model.train()
    for epoch in range(settings.epochs):
        tick, total = time.perf_counter(), 0.0
        for batch in torch.randperm(len(labels), generator=generator).split(settings.batch_size):
            loss = model(pixel_values=pixels[batch], labels=labels[batch]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        log(f"epoch {epoch + 1}/{settings.epochs}: training loss {total / len(labels):.4f}, {time.perf_counter() - tick:.1f} s")
    return model.eval()


def take_rows(dataset: Dataset, rows: np.ndarray) -> Dataset:
    """``dataset.select(rows)``, materialised with one Arrow ``take``: ``select`` keeps a lazy index
    mapping that ``datasets`` resolves row by row on every read (~20 s to read 55 000 images once)."""
    from datasets import Dataset

    flat = dataset.flatten_indices(keep_in_memory=True)
    return Dataset(flat.data.table.take(rows), info=dataset.info.copy())


def split_validation(train: Dataset, size: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """``(train, validation)``: a seeded random ``size`` rows of ``train`` held out (``None`` if ``size`` is 0),
    both in their original order."""
    import numpy as np

    if size == 0:
        return train, None
    if not 0 < size < len(train):
        raise ValueError(f"--validation-size must be between 0 and {len(train) - 1} (the training split has {len(train)} rows), got {size}.")
    held_out = np.zeros(len(train), dtype=bool)
    held_out[np.random.default_rng(seed).permutation(len(train))[:size]] = True
    return take_rows(train, np.flatnonzero(~held_out)), take_rows(train, np.flatnonzero(held_out))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``<output-dir>/summary.json``."""
    args = parse_args(argv)
    if args.dataset is None or Path(args.dataset).exists():
        # Everything is on disk: never reach for the Hub. huggingface_hub reads this at import, hence
        # the function-level imports of the HF libraries in this script.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from accelerate import PartialState
    from data import load_image_classification, seeded_subset

    from ocd_hf import evaluate_ocd, find_target_linear, harvest_deltas, train_hypernetwork

    if args.eval_split == "validation" and args.validation_size == 0:
        raise ValueError("--eval-split validation needs a validation split: pass --validation-size > 0.")
    state = PartialState()
    torch.set_num_threads(threads_per_process(state.num_processes, args.num_threads))
    output_dir, progress, started = Path(args.output_dir), not args.no_progress, time.perf_counter()
    timings: dict[str, float] = {}
    train, test = load_image_classification(
        args.dataset, args.image_column, args.label_column, train_split=args.train_split, test_split=args.test_split, seed=args.seed
    )
    names = train.features["label"].names
    train, validation = split_validation(train, args.validation_size, args.seed)
    torch.manual_seed(args.seed)
    model = build_lenet(names, np.asarray(train[0]["image"]).shape)
    train, test = (with_pixel_values(split, model.config.num_channels) for split in (train, test))
    if validation is not None:
        validation = with_pixel_values(validation, model.config.num_channels)
    timings["data"] = time.perf_counter() - started
    state.print(
        f"data: {len(train)} train / {len(validation) if validation is not None else 0} validation / {len(test)} test images, "
        f"{len(names)} classes"
    )

    tick = time.perf_counter()
    state.print(f"training LeNet-5 for {args.epochs} epochs on {len(train)} images")
    train_lenet(model, train, LeNetTraining.from_args(args), args.seed, log=state.print)
    timings["classifier"] = time.perf_counter() - tick
    timings["classifier_per_epoch"] = timings["classifier"] / max(1, args.epochs)
    backbone_dir = output_dir / "backbone"
    if state.is_main_process:
        model.save_pretrained(backbone_dir)
    target = find_target_linear(model, args.target_module)[0]

    tick = time.perf_counter()
    harvest_set = seeded_subset(train, args.harvest_size, args.seed)

    def fit_fold(fold: int, rows: list[int]) -> Any:
        """A LeNet-5 trained like the base one, without the harvest rows of this fold."""
        held_out = np.isin(np.asarray(train["id"]), np.asarray(harvest_set.select(rows)["id"]))
        torch.manual_seed(args.seed)
        fold_model = build_lenet(names, (model.config.image_size, model.config.image_size, model.config.num_channels))
        state.print(f"cross-fitting: training the LeNet-5 of fold {fold} on {int((~held_out).sum())} images")
        return train_lenet(fold_model, take_rows(train, np.flatnonzero(~held_out)), LeNetTraining.from_args(args), args.seed, log=state.print)

    deltas = harvest_deltas(
        model, harvest_set, target, output_dir / "deltas", batch_size=args.eval_batch_size, lr=args.harvest_lr,
        steps=args.harvest_steps, cross_fit=cross_fit_folds(args), fit_fold=fit_fold if args.cross_fit else None,
        base_model_name_or_path=str(backbone_dir.resolve()), accelerator=state, progress=progress,
    )
    timings["harvest"] = time.perf_counter() - tick
    state.print(f"{target}: {len(deltas)} deltas harvested; training the hypernetwork (delta mode {args.delta_mode})")
    tick = time.perf_counter()
    ocd_model = train_hypernetwork(
        output_dir / "deltas", model, output_dir / "hypernetwork", config_overrides=hypernetwork_overrides(args),
        num_steps=args.train_steps, batch_size=min(args.batch_size, len(deltas)), seed=args.seed,
        logging_steps=max(1, args.train_steps // 10), progress=progress,
    )
    timings["hypernetwork"] = time.perf_counter() - tick

    eval_set = seeded_subset(validation if args.eval_split == "validation" else test, args.eval_size, seed=0)
    summary: dict[str, Any] = {
        "arguments": vars(args), "target_module": target, "delta_mode": ocd_model.config.delta_mode,
        "sizes": {
            "classifier_train": len(train), "validation": len(validation) if validation is not None else 0, "harvest": len(deltas),
            "eval": len(eval_set),
        },
        "eval_split": args.eval_split, "timings_seconds": timings,
    }
    if state.is_main_process:
        tick = time.perf_counter()
        table = evaluate_ocd(
            ocd_model, eval_set, delta_dataset=deltas, seeds=tuple(range(args.sampling_seeds)), num_samples=args.num_samples,
            batch_size=args.eval_batch_size, progress=progress,
        )
        timings["evaluate"] = time.perf_counter() - tick
        summary["results"] = {kind: str(path) for kind, path in table.save(output_dir / "evaluation").items()}
        state.print(f"\n## {target} of LeNet-5 ({args.eval_split} split, {len(eval_set)} images)\n\n{table.to_markdown()}")
        timings["total"] = time.perf_counter() - started
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        state.print(f"total {timings['total']:.0f} s; summary: {output_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
