"""The "real gain" study: which OCD configuration beats the base model on held-out data, and by how much.

For every task and seed: train the base model (the seed sets its initialisation and data order, and
for SetFit the few-shot sample) on the training split minus a fixed validation split; harvest deltas
plainly and cross-fitted (``harvest_deltas(cross_fit=K)``) at each overfit learning rate; train every
generator (diffusion over the factorised delta, regression, label) on them; score base and OCD on
the validation split (used for every choice) and on the test split (read only for the final table).

    export PYTHONPATH=recipes                                      # the study reuses the recipes' data and training code
    python studies/gain_study.py --task deit --seeds 0 1 2
    python studies/gain_study.py --task lenet --seeds 0 1 2
    python studies/gain_study.py --task setfit --seeds 0 1 2
    python studies/gain_study.py --summarise deit lenet setfit     # tables -> docs/results/study_*.md

Head targets (DeiT, SetFit) are studied on cached head inputs: the head ``Linear`` is wrapped in a
one-layer model (:class:`CachedHead`) fed the exact features the full backbone gives it, which
leaves ``I(x)``, the deltas and the predictions unchanged (checked on every split: the logits must
equal the full model's) and makes each harvest and evaluation cost a matmul. Cross-fitted rows get
the features of their fold's model. LeNet's target (fc2) is not a head; the real model is used.

Records go to ``<workdir>/<task>/records.json`` as they are measured, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# HF_HUB_OFFLINE must be set before huggingface_hub is imported (hence the E402 exceptions below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from ocd_hf import (  # noqa: E402
    GENERATOR_TYPES,
    evaluate_ocd,
    find_target_linear,
    harvest_deltas,
    model_output_tensor,
    record_layer_io,
    train_hypernetwork,
)

OCD_ROW = {"diffusion": "ocd_ens", "regression": "ocd_1", "label": "ocd_1"}  # the row that scores each generator
METRICS = ("accuracy", "cross_entropy")


# ----- cached heads ------------------------------------------------------------------------------


class CachedHeadConfig(PretrainedConfig):
    model_type = "ocd-study-cached-head"

    def __init__(self, in_features: int = 1, num_labels: int = 2, **kwargs: Any) -> None:
        self.in_features = in_features
        super().__init__(num_labels=num_labels, **kwargs)


class CachedHead(PreTrainedModel):
    """A classification head alone, fed its cached input ``features``: ``logits = head(features)``."""

    config_class = CachedHeadConfig

    def __init__(self, config: CachedHeadConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(config.in_features, config.num_labels)

    def _init_weights(self, module: nn.Module) -> None:
        pass

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.head(features))

    @classmethod
    def from_layer(cls, layer: nn.Linear) -> "CachedHead":
        head = cls(CachedHeadConfig(in_features=layer.in_features, num_labels=layer.out_features))
        head.head.load_state_dict(layer.state_dict())
        return head.eval()


@torch.no_grad()
def head_features(model: nn.Module, target: str, rows: Dataset, collate: Callable, batch_size: int = 256) -> Dataset:
    """``features`` (the head's input) and ``label`` of every row, checked: the cached head's logits
    must equal the full model's."""
    _, layer = find_target_linear(model, target)
    head = CachedHead.from_layer(layer)
    features, logits, labels = [], [], []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        with record_layer_io(layer) as record:
            output = model_output_tensor(model(**collate(batch)))
        features.append(record["input"].detach().float())
        logits.append(output.float())
        labels.extend(batch["label"])
    features, logits = torch.cat(features), torch.cat(logits)
    torch.testing.assert_close(head(features).logits, logits, rtol=1e-4, atol=1e-5)
    return Dataset.from_dict({"features": features.numpy(), "label": labels, "id": rows["id"]})


# ----- tasks ---------------------------------------------------------------------------------------


@dataclass
class SeedData:
    """What one seed of a task gives the study."""

    backbone: nn.Module
    target: str
    harvest: Dataset  # rows to harvest, backbone inputs + label
    harvest_cross_fit: Dataset  # the same rows as the fold models see them
    fit_fold: Callable[[int, list[int]], nn.Module]
    validation: Dataset
    test: Dataset
    timings: dict[str, float]


class ImageTask:
    """Fashion-MNIST: a fixed validation split carved from the training split; the test split as is."""

    def __init__(self, args: argparse.Namespace) -> None:
        from data import load_image_classification, seeded_subset

        train, test = load_image_classification()
        self.names = train.features["label"].names
        split = train.train_test_split(test_size=args.validation_size, seed=1234)
        self.train, self.validation = split["train"], split["test"]
        self.test = seeded_subset(test, args.test_size, seed=0)
        self.args = args
        self.seeded_subset = seeded_subset

    def harvest_rows(self, seed: int) -> Dataset:
        return self.seeded_subset(self.train, self.args.harvest_size, seed)

    def without(self, rows: Dataset, fold_rows: list[int]) -> Dataset:
        """The training split minus the given rows of ``rows`` (matched by ``id``), materialised."""
        from lenet_ocd import take_rows

        held_out = np.isin(np.asarray(self.train["id"]), np.asarray(rows.select(fold_rows)["id"]))
        return take_rows(self.train, np.flatnonzero(~held_out))


class DeiTTask(ImageTask):
    name = "deit"

    def classifier_args(self, seed: int) -> argparse.Namespace:
        return argparse.Namespace(
            classifier_steps=self.args.classifier_steps, classifier_batch_size=128, classifier_lr=1e-3, seed=seed, no_progress=True
        )

    def train_model(self, rows: Dataset, seed: int, cache: Path) -> nn.Module:
        from data import pixel_values
        from deit_ocd import build_small_deit, train_classifier
        from transformers import DeiTForImageClassification

        if (cache / "config.json").is_file():
            return DeiTForImageClassification.from_pretrained(cache).eval()
        torch.manual_seed(seed)
        model = build_small_deit(self.names, (28, 28))
        train_classifier(self.classifier_args(seed), model, rows, lambda images: pixel_values(images, 1), cache / "checkpoints")
        model.save_pretrained(cache)
        return model.eval()

    def prepare(self, seed: int, workdir: Path) -> SeedData:
        from data import pixel_values

        def collate(batch: dict) -> dict:
            return {"pixel_values": pixel_values(batch["image"], 1)}

        timings = {}
        tick = time.perf_counter()
        model = self.train_model(self.train, seed, workdir / "base")
        timings["base_model"] = time.perf_counter() - tick
        harvest = self.harvest_rows(seed)
        k = self.args.cross_fit if "cross" in self.args.harvests else 0
        tick = time.perf_counter()
        fold_models = [self.train_model(self.without(harvest, list(range(f, len(harvest), k))), seed, workdir / f"fold-{f}") for f in range(k)]
        timings["fold_models"] = time.perf_counter() - tick
        tick = time.perf_counter()
        cached = head_features(model, "classifier", harvest, collate)
        folds = [head_features(m, "classifier", harvest.select(range(f, len(harvest), k)), collate) for f, m in enumerate(fold_models)]
        cross = interleave(folds, len(harvest), k) if k else cached
        data = SeedData(
            backbone=CachedHead.from_layer(model.classifier), target="head", harvest=cached, harvest_cross_fit=cross,
            fit_fold=lambda fold, rows: CachedHead.from_layer(fold_models[fold].classifier),
            validation=head_features(model, "classifier", self.validation, collate),
            test=head_features(model, "classifier", self.test, collate), timings=timings,
        )
        timings["features"] = time.perf_counter() - tick
        return data


class LeNetTask(ImageTask):
    name = "lenet"

    def __init__(self, args: argparse.Namespace) -> None:
        from lenet_ocd import with_pixel_values

        super().__init__(args)
        self.train, self.validation, self.test = (with_pixel_values(split, 1) for split in (self.train, self.validation, self.test))

    def train_model(self, rows: Dataset, seed: int, cache: Path) -> nn.Module:
        from lenet_ocd import LeNetTraining, build_lenet, train_lenet

        from ocd_hf import LeNet5ForImageClassification

        if (cache / "config.json").is_file():
            return LeNet5ForImageClassification.from_pretrained(cache).eval()
        torch.manual_seed(seed)
        model = build_lenet(self.names, (28, 28))
        train_lenet(model, rows, LeNetTraining(epochs=self.args.epochs), seed, log=lambda message: None)
        model.save_pretrained(cache)
        return model.eval()

    def prepare(self, seed: int, workdir: Path) -> SeedData:
        timings = {}
        tick = time.perf_counter()
        model = self.train_model(self.train, seed, workdir / "base")
        timings["base_model"] = time.perf_counter() - tick
        harvest = self.harvest_rows(seed)
        k = self.args.cross_fit
        tick = time.perf_counter()
        fold_models = [self.train_model(self.without(harvest, list(range(f, len(harvest), k))), seed, workdir / f"fold-{f}") for f in range(k)]
        timings["fold_models"] = time.perf_counter() - tick
        return SeedData(
            backbone=model, target="fc2", harvest=harvest, harvest_cross_fit=harvest, fit_fold=lambda fold, rows: fold_models[fold],
            validation=self.validation, test=self.test, timings=timings,
        )


class SetFitTask:
    """Amazon reviews, 8 texts per class per seed; validation texts come from the training split (never the few-shot ones)."""

    name = "setfit"

    def __init__(self, args: argparse.Namespace) -> None:
        from data import load_text_classification, seeded_subset

        self.train, test = load_text_classification(None, None, None)
        self.names = self.train.features["label"].names
        self.test = seeded_subset(test, args.test_size, seed=0)
        self.args = args

    def setfit_args(self) -> argparse.Namespace:
        from setfit_ocd import parse_args

        return parse_args(["--no-progress"])

    def train_model(self, rows: Dataset, seed: int, cache: Path) -> tuple[nn.Module, Any]:
        from setfit_ocd import train_setfit

        from ocd_hf import SetFitBackbone, tokenizer_from_setfit

        if (cache / "config.json").is_file():
            from transformers import AutoTokenizer

            return SetFitBackbone.from_pretrained(cache).eval(), AutoTokenizer.from_pretrained(cache)
        setfit_model = train_setfit(self.setfit_args(), rows, self.names, seed, cache / "checkpoints")
        backbone, tokenizer = SetFitBackbone.from_setfit(setfit_model), tokenizer_from_setfit(setfit_model)
        backbone.save_pretrained(cache)
        tokenizer.save_pretrained(cache)
        return backbone.eval(), tokenizer

    def prepare(self, seed: int, workdir: Path) -> SeedData:
        from data import exclude_ids, few_shot_sample, seeded_subset

        timings = {}
        few_shot = few_shot_sample(self.train, 8, seed)
        validation = seeded_subset(exclude_ids(self.train, few_shot), self.args.validation_size, seed)
        tick = time.perf_counter()
        model, tokenizer = self.train_model(few_shot, seed, workdir / "base")
        timings["base_model"] = time.perf_counter() - tick
        k = self.args.cross_fit
        tick = time.perf_counter()
        folds = []
        for fold in range(k):
            kept = [i for i in range(len(few_shot)) if i % k != fold]
            folds.append(self.train_model(few_shot.select(kept), seed, workdir / f"fold-{fold}"))
        timings["fold_models"] = time.perf_counter() - tick

        def collate_for(backbone: nn.Module, tok: Any) -> Callable:
            return lambda batch: backbone.tokenize(batch["text"], tok)

        tick = time.perf_counter()
        base_collate = collate_for(model, tokenizer)
        fold_rows = [few_shot.select(range(f, len(few_shot), k)) for f in range(k)]
        cross = interleave([head_features(m, "head", rows, collate_for(m, t)) for (m, t), rows in zip(folds, fold_rows)], len(few_shot), k)
        data = SeedData(
            backbone=CachedHead.from_layer(model.head), target="head", harvest=head_features(model, "head", few_shot, base_collate),
            harvest_cross_fit=cross, fit_fold=lambda fold, rows: CachedHead.from_layer(folds[fold][0].head),
            validation=head_features(model, "head", validation, base_collate), test=head_features(model, "head", self.test, base_collate),
            timings=timings,
        )
        timings["features"] = time.perf_counter() - tick
        return data


TASKS = {"deit": DeiTTask, "lenet": LeNetTask, "setfit": SetFitTask}


def interleave(folds: list[Dataset], num_rows: int, k: int) -> Dataset:
    """Rows ``i`` of fold ``i % k`` back in their original order (fold ``f`` holds rows ``f, f+k, ...``)."""
    order = np.argsort(np.concatenate([np.arange(f, num_rows, k) for f in range(k)]), kind="stable")
    columns = {name: np.concatenate([np.asarray(fold[name]) for fold in folds])[order] for name in folds[0].column_names}
    return Dataset.from_dict(columns)


# ----- the grid ------------------------------------------------------------------------------------


# Condition components per harvest. A cross-fitted delta's conditioning comes from its fold's model,
# whose features (the layer's input and output) are in another basis than the base model's; only the
# model output (class scores) means the same in every model. So cross-fitting is also run on the
# output alone, as stacking does.
CONDITIONING = {"plain": {"all": ["input", "activation", "output"]}, "cross": {"all": ["input", "activation", "output"], "output": ["output"]}}


def config_key(harvest: str, conditioning: str, lr: float, generator: str) -> str:
    return f"{harvest}/{conditioning}/lr={lr:g}/{generator}"


def table_values(table: Any) -> dict[str, dict[str, float]]:
    """``{row: {metric: mean over sampling seeds}}`` of a results table (``ocd_ens5`` is stored as ``ocd_ens``)."""
    suffix = str(table.metadata["num_samples"])
    names = {row.name: row.name[: -len(suffix)] if row.name.startswith(("ocd_ens", "ocd_mean")) else row.name for row in table.rows}
    return {names[row.name]: {m: row.mean(m) for m in METRICS} for row in table.rows}


def run_seed(task: Any, seed: int, args: argparse.Namespace, workdir: Path, records: dict[str, Any], save: Callable) -> None:
    data = task.prepare(seed, workdir)
    records.setdefault("timings", {})[str(seed)] = data.timings
    evaluate = {"seeds": (0,), "num_samples": args.num_samples, "batch_size": 256, "progress": False}
    for harvest in args.harvests:
        cross_fit = harvest == "cross"
        rows = data.harvest_cross_fit if cross_fit else data.harvest
        label_models: dict[str, Any] = {}
        for lr in args.lrs:
            deltas_dir = workdir / f"deltas-{harvest}-{lr:g}"
            tick = time.perf_counter()
            harvest_deltas(
                data.backbone, rows, data.target, deltas_dir, batch_size=256, lr=lr, steps=args.harvest_steps,
                cross_fit=args.cross_fit if cross_fit else None, fit_fold=data.fit_fold if cross_fit else None,
                delta_storage=args.delta_storage, progress=False,
            )
            data.timings[f"harvest/{deltas_dir.name}"] = time.perf_counter() - tick
            for conditioning, components in CONDITIONING[harvest].items():
                for generator in GENERATOR_TYPES:
                    key = f"{seed}/{config_key(harvest, conditioning, lr, generator)}"
                    if key in records["results"]:
                        continue
                    tick = time.perf_counter()
                    if generator != "label" or conditioning not in label_models:
                        overrides = {
                            "generator_type": generator, "condition_components": components,
                            "delta_mode": "factorised" if data.target != "fc2" else "auto",
                        }
                        model = train_hypernetwork(
                            deltas_dir, data.backbone, workdir / "hypernetworks" / key.replace("/", "_"), config_overrides=overrides,
                            num_steps=args.train_steps, batch_size=64, learning_rate=1e-3, seed=seed, progress=False,
                        )
                        if generator == "label":
                            label_models[conditioning] = model  # q(y | I(x)) does not depend on the lr, which only sets Δ(x, y)
                    else:
                        model = label_models[conditioning]
                    model.config.harvest_config = {**model.config.harvest_config, "lr": lr, "steps": args.harvest_steps}
                    train_seconds = time.perf_counter() - tick
                    # The bounds depend on the lr only: computed once, with the plain label generator.
                    bounds = generator == "label" and harvest == "plain"
                    wanted = ["base", OCD_ROW[generator]] + (["oracle", "label_free"] if bounds else [])
                    result = {"train_seconds": train_seconds}
                    for split in ("validation", "test"):
                        tick = time.perf_counter()
                        table = evaluate_ocd(model, getattr(data, split), rows=wanted, **evaluate)
                        result[split] = table_values(table)
                        result[f"{split}_seconds"] = time.perf_counter() - tick
                    records["results"][key] = result
                    save()
                    base, ocd = result["validation"]["base"], result["validation"][OCD_ROW[generator]]
                    print(
                        f"[{task.name} seed {seed}] {config_key(harvest, conditioning, lr, generator)}: validation acc "
                        f"{base['accuracy']:.4f} -> {ocd['accuracy']:.4f}, CE {base['cross_entropy']:.4f} -> {ocd['cross_entropy']:.4f}",
                        flush=True,
                    )


# ----- summary ---------------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarise(task_name: str, workdir: Path, output: Path) -> str:
    """The study table of one task (markdown), also written to ``output``: per configuration, the
    paired change vs base on validation and on test (mean ± sd over seeds); the configuration chosen
    on validation cross-entropy; and the bounds."""
    records = json.loads((workdir / task_name / "records.json").read_text())
    results = records["results"]
    seeds = sorted({key.split("/", 1)[0] for key in results}, key=int)
    configs = sorted({key.split("/", 1)[1] for key in results})
    lines = [
        "| configuration | seeds | val Δacc (pts) | val ΔCE | test Δacc (pts) | test ΔCE |",
        "|---|---|---|---|---|---|",
    ]
    chosen, best = None, float("inf")
    rows_by_config = {}
    for config in configs:
        generator = config.rsplit("/", 1)[1]
        row = OCD_ROW[generator]
        runs = [results[f"{seed}/{config}"] for seed in seeds if f"{seed}/{config}" in results]
        changes = {
            (split, metric): [run[split][row][metric] - run[split]["base"][metric] for run in runs]
            for split in ("validation", "test") for metric in METRICS
        }
        rows_by_config[config] = changes
        cells = []
        for split in ("validation", "test"):
            acc = mean_sd([100 * v for v in changes[(split, "accuracy")]])
            ce = mean_sd(changes[(split, "cross_entropy")])
            cells += [f"{acc[0]:+.2f} ± {acc[1]:.2f}", f"{ce[0]:+.4f} ± {ce[1]:.4f}"]
        lines.append(f"| {config} | {len(runs)} | " + " | ".join(cells) + " |")
        validation_ce = statistics.fmean(changes[("validation", "cross_entropy")])
        if len(runs) == len(seeds) and validation_ce < best:
            chosen, best = config, validation_ce
    base = {split: mean_sd([100 * results[f"{s}/{configs[0]}"][split]["base"]["accuracy"] for s in seeds]) for split in ("validation", "test")}
    base_ce = {split: mean_sd([results[f"{s}/{configs[0]}"][split]["base"]["cross_entropy"] for s in seeds]) for split in ("validation", "test")}
    text = [f"### {task_name}: {len(seeds)} seeds ({', '.join(seeds)})", ""]
    text.append(
        f"Base model: validation {base['validation'][0]:.2f} ± {base['validation'][1]:.2f}% (CE {base_ce['validation'][0]:.4f}), "
        f"test {base['test'][0]:.2f} ± {base['test'][1]:.2f}% (CE {base_ce['test'][0]:.4f} ± {base_ce['test'][1]:.4f})."
    )
    text += ["", "Change vs the base model of the same seed (paired), mean ± sd over seeds:", "", *lines, ""]
    bounds = [key for key in results if key.endswith("/label") and "/plain/all/" in f"/{key}"]  # bounds depend on the lr only
    if bounds:
        text += ["Bounds (they use the test label or the base's own prediction; not products), change vs base:", "",
                 "| | lr | split | oracle † Δacc | oracle † ΔCE | label-free † Δacc | label-free † ΔCE |", "|---|---|---|---|---|---|---|"]
        for config in sorted({key.split("/", 1)[1] for key in bounds}):
            for split in ("validation", "test"):
                runs = [results[f"{s}/{config}"][split] for s in seeds if f"{s}/{config}" in results]
                oracle = mean_sd([100 * (r["oracle"]["accuracy"] - r["base"]["accuracy"]) for r in runs])
                oracle_ce = mean_sd([r["oracle"]["cross_entropy"] - r["base"]["cross_entropy"] for r in runs])
                free = mean_sd([100 * (r["label_free"]["accuracy"] - r["base"]["accuracy"]) for r in runs])
                free_ce = mean_sd([r["label_free"]["cross_entropy"] - r["base"]["cross_entropy"] for r in runs])
                lr = config.split("/")[2]
                text.append(
                    f"| | {lr[3:]} | {split} | {oracle[0]:+.2f} ± {oracle[1]:.2f} | {oracle_ce[0]:+.4f} ± {oracle_ce[1]:.4f} "
                    f"| {free[0]:+.2f} ± {free[1]:.2f} | {free_ce[0]:+.4f} ± {free_ce[1]:.4f} |"
                )
        text.append("")
    text += [
        "Cost per configuration on this shared 2-core machine (one thread; means over runs): training, and evaluating the",
        "test split (base and OCD rows, plus the bounds for the plain label generator):", "",
        "| generator | training (s) | test evaluation (s) |", "|---|---|---|",
    ]
    for generator in GENERATOR_TYPES:
        runs = [run for key, run in results.items() if key.endswith(f"/{generator}") and "train_seconds" in run]
        trained = [run["train_seconds"] for run in runs if run["train_seconds"] > 1]  # a label model is trained once per harvest
        if runs:
            test_seconds = statistics.fmean(run["test_seconds"] for run in runs)
            text.append(f"| {generator} | {statistics.fmean(trained) if trained else 0:.0f} | {test_seconds:.0f} |")
    text.append("")
    if chosen is not None:
        changes = rows_by_config[chosen]
        verdicts = []
        for metric, scale, better in (("accuracy", 100, 1), ("cross_entropy", 1, -1)):
            mean, sd = mean_sd([scale * v for v in changes[("test", metric)]])
            significant = better * mean > 2 * sd if not np.isnan(sd) else False
            direction = "better" if better * mean > 0 else "worse"
            verdicts.append(f"test {metric} {mean:+.4g} ± {sd:.2g} ({'more' if significant else 'not more'} than 2 sd {direction})")
        text.append(f"**Chosen on validation cross-entropy: `{chosen}`** → " + "; ".join(verdicts) + ".")
    markdown = "\n".join(text) + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown, encoding="utf-8")
    return markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default="outputs/gain_study")
    parser.add_argument("--summarise", nargs="+", metavar="TASK", help="write the tables of these tasks from their records")
    parser.add_argument("--tag", default="", help="suffix of the summary file: docs/results/study_<task><tag>.md")
    parser.add_argument("--cross-fit", type=int, default=None, help="folds (default: 3; SetFit 4)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 5e-3], help="overfit Adam learning rates")
    parser.add_argument("--harvests", nargs="+", choices=("plain", "cross"), default=["plain", "cross"], help="harvests to run")
    parser.add_argument("--harvest-steps", type=int, default=3)
    parser.add_argument("--delta-storage", choices=("auto", "full", "factorised"), default="auto", help="harvest storage")
    parser.add_argument("--harvest-size", type=int, default=5000)
    parser.add_argument("--validation-size", type=int, default=None, help="default: 2000 images; 500 texts")
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=600, help="hypernetwork optimizer steps (batch 64)")
    parser.add_argument("--num-samples", type=int, default=5, help="draws of the diffusion ensemble")
    parser.add_argument("--classifier-steps", type=int, default=600, help="DeiT optimizer steps")
    parser.add_argument("--epochs", type=int, default=3, help="LeNet epochs")
    args = parser.parse_args(argv)
    if args.task is None and not args.summarise:
        parser.error("pass --task or --summarise")
    if args.cross_fit is None:
        args.cross_fit = 4 if args.task == "setfit" else 3
    if args.validation_size is None:
        args.validation_size = 500 if args.task == "setfit" else 2000
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.workdir)
    if args.summarise:
        for name in args.summarise:
            print(summarise(name, root, ROOT / "docs" / "results" / f"study_{name}{args.tag}.md"))
        return
    task_dir = root / args.task
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / "records.json"
    records = json.loads(path.read_text()) if path.is_file() else {"arguments": vars(args), "results": {}}

    def save() -> None:
        path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")

    task = TASKS[args.task](args)
    for seed in args.seeds:
        run_seed(task, seed, args, task_dir / f"seed-{seed}", records, save)
        save()


if __name__ == "__main__":
    main()
