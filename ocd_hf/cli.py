"""``ocd-hf``: the OCD pipeline from the command line.

    ocd-hf select-layer --model M --dataset D --output-dir O
    ocd-hf harvest      --model M --dataset D --target-module T --output-dir deltas/
    ocd-hf train        --model M --deltas deltas/ --output-dir ocd/
    ocd-hf evaluate     ocd/ TEST_DATASET eval/ --deltas deltas/
    ocd-hf aggregate    eval-*/results.json --output-dir eval/
    ocd-hf push         ocd/ me/ocd-model --results eval/results.json
    ocd-hf push-deltas  deltas/ me/ocd-deltas

Datasets are a Hub id or a local directory. ``harvest`` and ``evaluate`` tokenize ``--text-column`` or
preprocess ``--image-column`` themselves, the same way, and map string labels to class indices (``evaluate``
with the class names its model's harvest recorded); ``select-layer`` reads a dataset whose columns are
already the backbone's inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...) plus a label.
Harvest and train run on Accelerate: ``accelerate launch $(which ocd-hf) harvest ...`` shards them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from huggingface_hub import CommitInfo
from transformers import HfArgumentParser

from .backbones import load_pretrained_backbone
from .cards import eval_results_from_table
from .finetune import DEFAULT_LR, DEFAULT_OPTIMIZER, DEFAULT_STEPS, OPTIMIZERS
from .methods.ocd.configuration import DEFAULT_SCHEDULER_CLASS, PAPER_DENOISER_CONFIG, SAMPLING_SCHEDULERS
from .methods.ocd.training_args import OCDTrainingArguments
from .results import ResultsTable, aggregate_results
from .trainer import HISTORY_NAME

if TYPE_CHECKING:
    from datasets import Dataset

# datasets, diffusers and the OCD model are imported by the commands that use them, so that `ocd-hf --help` is quick.


def load_split(name_or_path: str, split: str | None) -> Dataset:
    """A dataset split from a ``save_to_disk`` directory or the Hub (``--split``: see :func:`ocd_hf.data.select_split`)."""
    from .methods.ocd.harvest import load_source_dataset

    return load_source_dataset(name_or_path, None, split)


def load_model(args: argparse.Namespace):
    return load_pretrained_backbone(args.model, args.model_class, revision=args.revision).eval()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="backbone: a Hub id or a local directory")
    parser.add_argument("--model-class", default=None,
                        help="transformers (or ocd_hf.backbones) class that loads it (default: from its config)")
    parser.add_argument("--revision", default=None, help="backbone revision on the Hub")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a Hub id or a save_to_disk directory of model inputs + labels")
    parser.add_argument("--split", default=None,
                        help="the split to use (default: 'train', or the only split, or the directory's single dataset)")
    parser.add_argument("--label-column", default="label")


def add_raw_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Raw text or images, turned into the backbone's inputs as the harvest does (:func:`source_collate_fn`)."""
    parser.add_argument("--text-column", default=None, help="tokenize this column with the backbone's tokenizer")
    parser.add_argument("--image-column", default=None, help="preprocess this column with the backbone's image processor")
    parser.add_argument("--max-length", type=int, default=128, help="truncate --text-column to this many tokens")


def run_select_layer(args: argparse.Namespace) -> None:
    from .methods.ocd import select_layer

    dataset = load_split(args.dataset, args.split)
    if args.label_column not in dataset.column_names:
        raise ValueError(
            f"--label-column {args.label_column!r} is not a column of the dataset (columns: {dataset.column_names}); "
            "pass the column holding the labels."
        )
    rows = dataset.with_format("torch")[: args.num_samples]
    labels = rows.pop(args.label_column)
    ranking = select_layer(
        load_model(args), rows, labels, candidates=args.candidates, num_draws=args.num_draws,
        num_samples=args.num_samples, perturbation=args.perturbation, seed=args.seed, output_dir=args.output_dir,
    )
    print(ranking.to_markdown())


def run_harvest(args: argparse.Namespace) -> None:
    from .methods.ocd import harvest_from_pretrained, load_harvest_metadata

    harvest_from_pretrained(
        args.model, args.dataset, args.target_module, args.output_dir, model_revision=args.revision,
        model_class=args.model_class, split=args.split, text_column=args.text_column, image_column=args.image_column,
        label_column=args.label_column, max_length=args.max_length, max_samples=args.max_samples, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, steps=args.steps, dtype=args.dtype, shard_size=args.shard_size,
        store_trajectory=args.store_trajectory, delta_storage=args.delta_storage, factor_tolerance=args.factor_tolerance,
    )
    metadata = load_harvest_metadata(args.output_dir)
    print(
        f"{metadata['num_samples']} deltas in {args.output_dir} ({metadata['harvest_config']['delta_storage']} storage, "
        f"{metadata.get('bytes_per_sample')} bytes per sample)"
    )


@dataclass
class TrainCommandArguments:
    """What ``ocd-hf train`` needs besides the training settings (:class:`~ocd_hf.OCDTrainingArguments`)."""

    model: str = field(metadata={"help": "backbone: a Hub id or a local directory"})
    deltas: str = field(metadata={"help": "a directory written by `ocd-hf harvest`"})
    output_dir: str = field(metadata={"help": "where the hypernetwork, its history and checkpoints go"})
    model_class: str | None = field(default=None, metadata={
        "help": "transformers (or ocd_hf.backbones) class that loads the backbone (default: from its config)"})
    revision: str | None = field(default=None, metadata={"help": "backbone revision on the Hub"})
    delta_mode: Literal["auto", "full", "factorised", "latent"] = field(default="auto", metadata={
        "help": "auto: factorised where the harvested deltas are rank-1, else full; latent: diffusion in a weight VAE's latent space "
        "(trained first, --vae-steps), for per-token layers on a CPU"})
    denoiser: Literal["small", "paper"] = field(default="small", metadata={"help": "UNet size in full mode"})
    generator_type: Literal["diffusion", "regression", "label"] = field(default="diffusion", metadata={
        "help": "diffusion (the paper), regression (deterministic MLP) or label (q(y|I(x)) over exact per-label deltas)"})
    conditioning: list[str] | None = field(default=None, metadata={
        "help": "condition components of I(x) among input, activation, output (default: all three)"})
    scheduler_class: str = field(default=DEFAULT_SCHEDULER_CLASS, metadata={
        "help": "the diffusers scheduler that samples (training noises with DDPM's forward process whatever it is)",
        "choices": list(SAMPLING_SCHEDULERS)})
    num_inference_steps: int = field(default=10, metadata={"help": "scheduler steps when sampling"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": '"latest" or a checkpoint directory'})


TRAIN_DATACLASSES = (TrainCommandArguments, OCDTrainingArguments)


def dataclass_from_namespace(cls: type, args: argparse.Namespace) -> Any:
    """Build dataclass ``cls`` from the parsed command line (its fields are attributes of ``args``)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init})


def run_train(args: argparse.Namespace) -> None:
    from .checks import check_writable_dir
    from .methods.ocd import train_hypernetwork

    command = dataclass_from_namespace(TrainCommandArguments, args)
    check_writable_dir(command.output_dir, "--output-dir")  # before loading and training, not after
    overrides: dict = {
        "num_inference_steps": command.num_inference_steps, "generator_type": command.generator_type, "scheduler_class": command.scheduler_class,
    }
    if command.conditioning:
        overrides["condition_components"] = command.conditioning
    if command.delta_mode != "auto":
        overrides["delta_mode"] = command.delta_mode
    if command.denoiser == "paper":
        overrides["denoiser_config"] = PAPER_DENOISER_CONFIG
    train_hypernetwork(
        command.deltas, load_model(args), command.output_dir, dataclass_from_namespace(OCDTrainingArguments, args),
        config_overrides=overrides, resume_from_checkpoint=command.resume_from_checkpoint,
    )
    history = json.loads((Path(command.output_dir) / HISTORY_NAME).read_text())
    best = f" (lowest validation loss {history['best_val_loss']:.4g})" if history["saved_step"] == history["best_step"] else ""
    print(f"Saved the weights of step {history['saved_step']} of {history['global_step']}{best} to {command.output_dir}")


def run_evaluate(args: argparse.Namespace) -> None:
    table = evaluate_from_paths(
        args.model_dir, args.eval_dataset, args.output_dir, split=args.split, delta_dataset_path=args.deltas,
        alternative_model_path=args.alternative_model, label_column=args.label_column, text_column=args.text_column,
        image_column=args.image_column, max_length=args.max_length, batch_size=args.batch_size,
        seeds=args.seeds, num_samples=args.num_samples, max_examples=args.max_examples,
    )
    print(table.to_markdown())


def run_aggregate(args: argparse.Namespace) -> None:
    print(aggregate_from_paths(args.results, args.output_dir).to_markdown())


def run_push(args: argparse.Namespace) -> None:
    commit = push_hypernetwork_from_directory(
        args.model_dir, args.repo_id, revision=args.hub_revision, private=args.private or None,
        commit_message=args.commit_message, create_pr=args.create_pr, results_path=args.results,
        dataset_id=args.dataset_id,
    )
    print(commit.commit_url)


def run_push_deltas(args: argparse.Namespace) -> None:
    from .methods.ocd import push_deltas_to_hub

    commit = push_deltas_to_hub(args.deltas_dir, args.repo_id, revision=args.hub_revision, private=args.private or None)
    print(commit.commit_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocd-hf", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # HfArgumentParser builds a subcommand's options from dataclasses (``train``); the others add theirs by hand.
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)

    select = commands.add_parser("select-layer", help="rank Linear layers by loss entropy under perturbation")
    add_model_arguments(select)
    add_dataset_arguments(select)
    select.add_argument("--candidates", nargs="*", default=None, help="layer names (default: every Linear used)")
    select.add_argument("--num-draws", type=int, default=64)
    select.add_argument("--num-samples", type=int, default=64)
    select.add_argument("--perturbation", choices=["gaussian", "reinit"], default="gaussian")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--output-dir", default=None)
    select.set_defaults(run=run_select_layer)

    harvest = commands.add_parser("harvest", help="overfit the target layer on each sample; write the delta dataset")
    add_model_arguments(harvest)
    add_dataset_arguments(harvest)
    harvest.add_argument("--target-module", required=True, help="exact name, dotted suffix or regex of an nn.Linear")
    harvest.add_argument("--output-dir", required=True)
    harvest.add_argument("--batch-size", type=int, default=None,
                         help="samples fine-tuned at once (default: by layer, see harvest_deltas; recorded in harvest.json)")
    harvest.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=DEFAULT_OPTIMIZER)
    harvest.add_argument("--lr", type=float, default=DEFAULT_LR)
    harvest.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    harvest.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    harvest.add_argument("--shard-size", type=int, default=1024)
    harvest.add_argument("--store-trajectory", action="store_true")
    add_raw_input_arguments(harvest)
    harvest.add_argument("--max-samples", type=int, default=None)
    harvest.add_argument("--delta-storage", choices=["auto", "full", "factorised"], default="auto",
                         help="auto: the rank-1 factor u where measured exact, else full matrices")
    harvest.add_argument("--factor-tolerance", type=float, default=0.05,
                         help="largest relative residual ‖Δ − u vᵀ‖/‖Δ‖ accepted for factorised storage")
    harvest.set_defaults(run=run_harvest)

    train = commands.add_parser(
        "train", help="train the diffusion hypernetwork on a delta dataset", dataclass_types=TRAIN_DATACLASSES,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="base vs OCD vs ablations and bounds on a held-out split")
    evaluate.add_argument("model_dir")
    evaluate.add_argument("eval_dataset", help="a Hub id or a save_to_disk directory: model inputs (or --text-column / "
                          "--image-column) + labels")
    evaluate.add_argument("output_dir")
    evaluate.add_argument("--split", default=None)
    evaluate.add_argument("--deltas", default=None, help="delta dataset for the nearest-neighbour ablation")
    evaluate.add_argument("--alternative-model", default=None, help="a hypernetwork on another layer")
    evaluate.add_argument("--label-column", default="label")
    add_raw_input_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    evaluate.add_argument("--num-samples", type=int, default=5)
    evaluate.add_argument("--max-examples", type=int, default=None)
    evaluate.set_defaults(run=run_evaluate)

    aggregate = commands.add_parser("aggregate", help="mean ± sd over results of independently trained models")
    aggregate.add_argument("results", nargs="+", help="results.json files written by `evaluate`")
    aggregate.add_argument("--output-dir", default=None)
    aggregate.set_defaults(run=run_aggregate)

    push = commands.add_parser("push", help="push a saved hypernetwork and its model card to the Hub")
    push.add_argument("model_dir")
    push.add_argument("repo_id")
    push.add_argument("--results", default=None, help="results.json from `evaluate`, shown in the card")
    push.add_argument("--dataset-id", default=None, help="Hub id of the evaluation dataset, for the card")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--create-pr", action="store_true")
    push.set_defaults(run=run_push)

    push_deltas = commands.add_parser("push-deltas", help="push a delta dataset and its card to the Hub")
    push_deltas.add_argument("deltas_dir")
    push_deltas.add_argument("repo_id")
    push_deltas.set_defaults(run=run_push_deltas)
    for sub in (push, push_deltas):
        sub.add_argument("--hub-revision", default=None, help="branch to push to (created if missing)")
        sub.add_argument("--private", action="store_true")
    return parser


# ----- helpers the commands run --------------------------------------------------------------------


def push_hypernetwork_from_directory(
    model_path: str,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    results_path: str | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    dataset_split: str | None = None,
    training_history_path: str | None = None,
) -> CommitInfo:
    """Push the hypernetwork saved in ``model_path`` (for ``ocd-hf push``); its backbone is loaded from the config.

    ``results_path`` (a ``results.json`` written by ``evaluate_ocd``) puts the results table in the card
    and, with ``dataset_id``, the OCD rows' metrics in its ``model-index``. The training settings come
    from ``training_history_path``, default ``model_path/training_history.json`` when present.
    """
    from .methods.ocd import OCDWrapper
    from .methods.ocd.evaluation import GENERATED_KIND
    from .methods.ocd.model_card import default_task_type

    model = OCDWrapper.from_pretrained(model_path)
    card_kwargs: dict[str, Any] = {}
    if results_path is not None:
        table = ResultsTable.from_json(Path(results_path))
        card_kwargs["results_table"] = table.to_markdown()
        if dataset_id is not None:
            card_kwargs["eval_results"] = eval_results_from_table(
                table, dataset_type=dataset_id, dataset_name=dataset_name or dataset_id, dataset_split=dataset_split,
                task_type=default_task_type(model), kinds=(GENERATED_KIND,),
            )
    if dataset_id is not None:
        card_kwargs["datasets"] = [dataset_id]
    history_file = Path(training_history_path or Path(model_path) / HISTORY_NAME)
    if training_history_path is not None or history_file.is_file():
        history = json.loads(history_file.read_text(encoding="utf-8"))
        card_kwargs["training_config"] = {"steps": history.get("global_step"), **history.get("settings", {})}
    return model.push_to_hub(
        repo_id, revision=revision, private=private, token=token, commit_message=commit_message, create_pr=create_pr,
        model_card_kwargs=card_kwargs,
    )


def evaluate_from_paths(
    model_path: str,
    eval_dataset_path: str,
    output_dir: str,
    *,
    split: str | None = None,
    delta_dataset_path: str | None = None,
    alternative_model_path: str | None = None,
    label_column: str = "label",
    text_column: str | None = None,
    image_column: str | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    seeds: Sequence[int] = (0, 1, 2),
    num_samples: int = 5,
    rows: Sequence[str] | None = None,
    max_examples: int | None = None,
    progress: bool = True,
) -> ResultsTable:
    """Load a saved hypernetwork (and its backbone), the evaluation dataset and optionally the harvested
    deltas and a second hypernetwork sharing the backbone; evaluate and write the results to ``output_dir``
    (checked writable first).

    The dataset (a Hub id or a ``save_to_disk`` directory; ``split`` as in :func:`ocd_hf.data.select_split`,
    never defaulting to ``train``) is read as ``ocd-hf harvest`` reads it: the backbone's input columns, or
    ``text_column`` tokenized with the backbone's tokenizer (``max_length`` tokens) or ``image_column`` through
    its image processor; labels are checked and string labels mapped with the class names of the model's config
    (recorded by its harvest), else of the ``delta_dataset_path`` harvest.
    """
    from .checks import check_writable_dir
    from .methods.ocd import OCDWrapper, evaluate_ocd, load_harvest_metadata
    from .methods.ocd.harvest import SampleReader, class_names, load_source_dataset, source_collate_fn

    data = load_source_dataset(eval_dataset_path, None, split, default=None)
    check_writable_dir(output_dir)
    model = OCDWrapper.from_pretrained(model_path)
    alternative = OCDWrapper.from_pretrained(alternative_model_path, backbone=model.backbone) if alternative_model_path else None
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    names = class_names(model)
    if names is None and delta_dataset_path:
        names = load_harvest_metadata(delta_dataset_path)["source"].get("label_names")
    collate_fn = None
    if text_column is not None or image_column is not None:
        if not model.config.base_model_name_or_path:
            raise ValueError(
                f"{model_path!r} records no base_model_name_or_path to load the tokenizer / image processor from: "
                "preprocess the dataset into the backbone's inputs and drop --text-column / --image-column."
            )
        collate_fn = source_collate_fn(
            data, model.config.base_model_name_or_path, revision=model.config.base_model_revision,
            text_column=text_column, image_column=image_column, max_length=max_length,
        )
    reader = SampleReader(
        data, model.backbone, model.config.task, label_column=label_column, collate_fn=collate_fn, label_names=names,
        missing_label_names="neither the model's config (id2label) nor a harvest (--deltas) records them; pass the "
        "harvest's directory as --deltas, or map the labels to class indices first", purpose="evaluate",
    )
    return evaluate_ocd(
        model, reader.batches(batch_size), delta_dataset=delta_dataset_path or None, alternative_model=alternative,
        seeds=seeds, num_samples=num_samples, rows=rows, batch_size=batch_size, label_column=label_column,
        output_dir=output_dir, progress=progress,
    )


def aggregate_from_paths(result_paths: Sequence[str], output_dir: str | None = None) -> ResultsTable:
    """Aggregate ``results.json`` files of independently trained models (mean ± sd over models)."""
    table = aggregate_results([ResultsTable.from_json(Path(path)) for path in result_paths])
    if output_dir is not None:
        table.save(output_dir)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Run a command; an error is printed as one line (``--debug``: with its traceback) and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"ocd-hf {args.command}: error: {type(error).__name__}: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
