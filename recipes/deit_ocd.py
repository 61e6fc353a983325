"""OCD on the classification head of a DeiT image classifier, end to end.

Fine-tune (or, by default, train from scratch) the image classifier on the training split ->
harvest the per-sample deltas of its head on training images -> train the hypernetwork ->
evaluate on the test split -> save. The results table is saved as JSON, markdown and PNG.

    accelerate launch recipes/deit_ocd.py            # or: python recipes/deit_ocd.py
    python recipes/deit_ocd.py --model facebook/deit-base-distilled-patch16-224 \\
        --dataset zalando-datasets/fashion_mnist --classifier-steps 2000

Default, offline: a small ``DeiTForImageClassification`` built from a ``DeiTConfig`` (28×28
grey images in 7×7 patches, 4 layers of width 64), trained for a few minutes on Fashion-MNIST from
the Debian package ``dataset-fashion-mnist``. With ``--model`` a pretrained checkpoint is loaded
with a new head for the dataset's labels (its image processor does the resizing) and fine-tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ocd_options import add_ocd_arguments, cross_fit_folds, hypernetwork_overrides, threads_per_process

HEAD_NAMES = ("classifier", "cls_classifier")  # DeiTForImageClassification, ...WithTeacher (distilled checkpoints)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local path of an image classifier (default: a small DeiT from a config)")
    parser.add_argument("--dataset", default=None, help="Hub id or local path (default: Fashion-MNIST from the Debian package)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--target-module", default=None, help=f"Linear layer to generate (default: the first of {HEAD_NAMES})")
    parser.add_argument("--output-dir", default="outputs/deit_ocd")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the hypernetwork to REPO, the classifier to REPO-backbone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-steps", type=int, default=600, help="optimizer steps of classifier training")
    parser.add_argument("--classifier-batch-size", type=int, default=128)
    parser.add_argument("--classifier-lr", type=float, default=1e-3)
    parser.add_argument("--harvest-size", type=int, default=5000, help="training images whose deltas are harvested")
    parser.add_argument("--harvest-lr", type=float, default=5e-4, help="Adam lr of the single-sample fine-tuning (paper: 5e-4)")
    parser.add_argument("--harvest-steps", type=int, default=3, help="Adam steps of the single-sample fine-tuning (paper: 3)")
    parser.add_argument(
        "--validation-size", type=int, default=2000, help="training images held out (seeded) as the validation split; never trained on"
    )
    parser.add_argument("--eval-split", choices=("validation", "test"), default="test", help="split that is evaluated")
    add_ocd_arguments(parser, fold_models="classifiers", generator="regression")  # chosen on validation: docs/when_ocd_helps.md
    parser.add_argument("--train-steps", type=int, default=1000, help="hypernetwork optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64, help="hypernetwork training batch size")
    parser.add_argument("--test-size", type=int, default=2000, help="images of --eval-split evaluated (a fixed random subset; all if larger)")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=5, help="draws of the OCD ensemble")
    parser.add_argument("--sampling-seeds", type=int, default=3, help="sampling seeds of the hypernetwork")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def build_small_deit(names: list[str], image_shape: tuple[int, ...], patch_size: int = 7) -> Any:
    """The default backbone: a small DeiT with random weights, sized for 28×28 grey images (4×4 patches of 7×7)."""
    from transformers import DeiTConfig, DeiTForImageClassification

    height, width = image_shape[:2]
    if height != width or height % patch_size:
        raise ValueError(f"The default DeiT needs square images with a side divisible by {patch_size}, got {image_shape}; pass --model.")
    config = DeiTConfig(
        image_size=height, patch_size=patch_size, num_channels=image_shape[2] if len(image_shape) == 3 else 1, hidden_size=64,
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
    )
    return DeiTForImageClassification(config)


def load_classifier(args: argparse.Namespace, names: list[str], example_image: Any) -> tuple[Any, Any]:
    """``(model, image processor or None)``: the default small DeiT, or a checkpoint with a new head for ``names``."""
    import numpy as np
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    if args.model is None:
        return build_small_deit(names, np.asarray(example_image).shape), None
    model = AutoModelForImageClassification.from_pretrained(
        args.model, num_labels=len(names), id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    return model, AutoImageProcessor.from_pretrained(args.model)


def train_classifier(args: argparse.Namespace, model: Any, train: Any, preprocess: Any, output_dir: Path) -> None:
    """Fine-tune every weight of ``model`` on the training split with the ``transformers`` Trainer (cross-entropy)."""
    import torch
    from torch.nn import functional as F
    from transformers import Trainer, TrainingArguments

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:  # one batched preprocessing call per step
        return {"pixel_values": preprocess([row["image"] for row in rows]), "labels": torch.tensor([int(row["label"]) for row in rows])}

    def cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        # Also fits heads whose forward takes no labels (e.g. DeiTForImageClassificationWithTeacher).
        return F.cross_entropy(outputs.logits, labels)

    training_args = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.classifier_steps, per_device_train_batch_size=args.classifier_batch_size,
        learning_rate=args.classifier_lr, warmup_steps=max(1, args.classifier_steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.05, logging_steps=max(1, args.classifier_steps // 10), save_strategy="no", report_to="none",
        remove_unused_columns=False, seed=args.seed, disable_tqdm=args.no_progress,
    )
    rows = train.select_columns(["image", "label"]).with_format("numpy")
    Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate, compute_loss_func=cross_entropy).train()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``<output-dir>/summary.json``."""
    args = parse_args(argv)
    if (args.model is None or Path(args.model).exists()) and (args.dataset is None or Path(args.dataset).exists()):
        # Everything is on disk: never reach for the Hub. huggingface_hub reads this at import, hence
        # the function-level imports of the HF libraries in this script.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate import PartialState
    from data import load_image_classification, pixel_values, seeded_subset

    from ocd_hf import evaluate_ocd, find_target_linear, harvest_deltas, train_hypernetwork

    state = PartialState()
    torch.set_num_threads(threads_per_process(state.num_processes))
    output_dir, progress, started = Path(args.output_dir), not args.no_progress, time.perf_counter()
    timings: dict[str, float] = {}
    train, test = load_image_classification(
        args.dataset, args.image_column, args.label_column, train_split=args.train_split, test_split=args.test_split, seed=args.seed
    )
    names = train.features["label"].names
    if args.validation_size:
        carved = train.train_test_split(test_size=args.validation_size, seed=1234)
        train, validation = carved["train"], carved["test"]
    elif args.eval_split == "validation":
        raise ValueError("--eval-split validation needs --validation-size > 0.")
    state.print(f"data: {len(train)} train / {args.validation_size} validation / {len(test)} test images, {len(names)} classes")

    torch.manual_seed(args.seed)
    model, processor = load_classifier(args, names, train[0]["image"])
    num_channels = model.config.num_channels

    def preprocess(images: list) -> torch.Tensor:
        return pixel_values(images, num_channels, processor)

    def harvest_inputs(batch: dict[str, list]) -> dict[str, torch.Tensor]:
        return {"pixel_values": preprocess(batch["image"])}

    def evaluation_batch(rows: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"pixel_values": preprocess([row["image"] for row in rows])}, torch.tensor([row["label"] for row in rows])

    tick = time.perf_counter()
    state.print(f"training {type(model).__name__} for {args.classifier_steps} steps")
    train_classifier(args, model, train, preprocess, output_dir / "classifier-checkpoints")
    timings["classifier"] = time.perf_counter() - tick
    backbone_dir = output_dir / "backbone"
    if state.is_main_process:
        model.save_pretrained(backbone_dir)
        if processor is not None:
            processor.save_pretrained(backbone_dir)
    target = args.target_module or next((name for name in HEAD_NAMES if name in dict(model.named_modules())), None)
    if target is None:
        raise ValueError(f"{type(model).__name__} has none of the heads {HEAD_NAMES}; pass --target-module (a Linear layer name).")
    target = find_target_linear(model, target)[0]

    tick = time.perf_counter()
    harvest_set = seeded_subset(train, args.harvest_size, args.seed)

    def fit_fold(fold: int, rows: list[int]) -> Any:
        """A classifier trained like the base one, without the harvest rows of this fold."""
        held_out = set(harvest_set.select(rows)["id"])
        fold_train = train.filter(lambda ids: [i not in held_out for i in ids], input_columns="id", batched=True)
        torch.manual_seed(args.seed)
        fold_model, _ = load_classifier(args, names, train[0]["image"])
        state.print(f"cross-fitting: training the classifier of fold {fold} on {len(fold_train)} images")
        train_classifier(args, fold_model, fold_train, preprocess, output_dir / f"fold-{fold}-checkpoints")
        return fold_model

    deltas = harvest_deltas(
        model, harvest_set, target, output_dir / "deltas", collate_fn=harvest_inputs, batch_size=args.eval_batch_size,
        lr=args.harvest_lr, steps=args.harvest_steps, cross_fit=cross_fit_folds(args), fit_fold=fit_fold if args.cross_fit else None,
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

    summary: dict[str, Any] = {
        "arguments": vars(args), "target_module": target, "delta_mode": ocd_model.config.delta_mode, "timings_seconds": timings,
    }
    if state.is_main_process:
        tick = time.perf_counter()
        table = evaluate_ocd(
            ocd_model, seeded_subset(validation if args.eval_split == "validation" else test, args.test_size, seed=0),
            delta_dataset=deltas, seeds=tuple(range(args.sampling_seeds)),
            num_samples=args.num_samples, collate_fn=evaluation_batch, batch_size=args.eval_batch_size, progress=progress,
        )
        timings["evaluate"] = time.perf_counter() - tick
        summary["results"] = {kind: str(path) for kind, path in table.save(output_dir / "evaluation").items()}
        state.print(f"\n## {target} of {type(model).__name__}\n\n{table.to_markdown()}")
        if args.push_to_hub:
            summary["pushed"] = push(args.push_to_hub, ocd_model, processor, table)
        timings["total"] = time.perf_counter() - started
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        state.print(f"total {timings['total']:.0f} s; summary: {output_dir / 'summary.json'}")
    return summary


def push(repo: str, ocd_model: Any, processor: Any, table: Any) -> dict[str, str]:
    """Push the trained classifier (and its processor) to ``REPO-backbone``, then the hypernetwork, whose
    config names that backbone so that ``OCDWrapper.from_pretrained(REPO)`` finds it."""
    backbone_repo = f"{repo}-backbone"
    ocd_model.backbone.push_to_hub(backbone_repo)
    if processor is not None:
        processor.push_to_hub(backbone_repo)
    ocd_model.config.base_model_name_or_path = backbone_repo
    ocd_model.push_to_hub(repo, results_table=table.to_markdown())
    return {"backbone": backbone_repo, "hypernetwork": repo}


if __name__ == "__main__":
    main()
