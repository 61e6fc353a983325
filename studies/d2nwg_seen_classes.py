"""Where a trained D2NWG generator of ``recipes/fewshot_mcdi.py --method d2nwg`` fails: one generated head on
episodes of the meta-*train* classes vs unseen (meta-test) classes, next to logistic regression on the same
episodes, and the accuracy of the zoo's heads before and after the VAE round trip on every item of their own
task's classes (reconstructions judged by accuracy, not only by error), and the same round trip for heads fitted
as the zoo's on new tasks of the meta-train and of the unseen meta-test classes.

    PYTHONPATH=recipes python studies/d2nwg_seen_classes.py /work/runs/d2nwg-wordnet-1shot-s0 --seed 0 --shots 1

Pass the run's ``--seed`` and source arguments: the class split and the embedding cache are the run's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fewshot_mcdi
import torch

from ocd_hf.episodes import EpisodeSampler
from ocd_hf.fewshot import episode_accuracy, head_logits, logistic_regression_heads
from ocd_hf.methods.d2nwg import D2NWGHeadGenerator
from ocd_hf.task_heads import fit_task_heads, resolve_head_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the recipe's --output-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--zoo-tasks", type=int, default=300, help="zoo tasks whose heads go through the VAE")
    known, recipe_args = parser.parse_known_args()
    torch.set_num_threads(1)
    args = fewshot_mcdi.parse_args(["--method", "d2nwg", "--seed", str(known.seed), "--shots", str(known.shots), "--output-dir", str(known.run),
                                    *recipe_args])
    splits, _ = fewshot_mcdi.load_splits(args)
    root = known.run / f"{args.n_way}way-{known.shots}shot"
    generator = D2NWGHeadGenerator.from_pretrained(root / "generator")
    one = fewshot_mcdi.d2nwg_draws(generator, known.seed, 1)
    for split in ("train", "test"):
        episodes = EpisodeSampler(splits[split], args.n_way, known.shots, args.queries, seed=777).sample(known.episodes, column="embedding")
        generated = episode_accuracy(one(episodes.support, episodes.support_labels)[:, 0], episodes)
        reference = episode_accuracy(logistic_regression_heads(episodes.support, episodes.support_labels, args.n_way), episodes)
        print(f"{split} classes, {known.episodes} episodes: D2NWG one draw {100 * generated.mean():.1f}%, "
              f"logistic regression {100 * reference.mean():.1f}%")
    zoo, _ = resolve_head_dataset(root / "heads")
    rows = zoo.select(range(min(known.zoo_tasks, len(zoo))))[:]
    heads = torch.as_tensor(rows["targets"])[:, -1].float()  # the last checkpoint of each task
    with torch.no_grad():
        reconstructed = generator.reconstruct_heads(heads)
    features, distribution = splits["train"].features("embedding").float(), splits["train"]
    accuracy = {"zoo heads": [], "VAE reconstructions": []}
    for task, classes in enumerate(torch.as_tensor(rows["classes"]).tolist()):
        indices = [torch.as_tensor(distribution.rows_of(int(c))) for c in classes]
        items = torch.cat([features[i] for i in indices])
        labels = torch.cat([torch.full((len(i),), position) for position, i in enumerate(indices)])
        for name, head in (("zoo heads", heads[task]), ("VAE reconstructions", reconstructed[task])):
            accuracy[name].append(float((head_logits(head[None], items[None])[0].argmax(-1) == labels).float().mean()))
    error = float((reconstructed - heads).norm() / heads.norm())
    print(f"{len(heads)} zoo tasks, every item of their classes: " + ", ".join(f"{name} {100 * sum(v) / len(v):.1f}%" for name, v in accuracy.items())
          + f"; relative reconstruction error {error:.2f}")
    for split in ("train", "test"):
        unseen_round_trip(generator, splits[split], args, known.zoo_tasks, split)


def unseen_round_trip(generator: D2NWGHeadGenerator, distribution, args, num_tasks: int, split: str) -> None:
    """Heads fitted exactly as the zoo's (``--pool-size`` items per class, ``--head-steps`` Adam steps, the last
    one kept) on tasks of ``split``'s classes, before and after the VAE round trip: can the VAE represent heads of
    classes it never saw (``test``), or only those of the meta-train classes (``train``)?"""
    rng = torch.Generator().manual_seed(1234)
    features, classes = distribution.features("embedding").float(), torch.as_tensor(distribution.classes)
    tasks = [classes[torch.randperm(len(classes), generator=rng)[: args.n_way]] for _ in range(num_tasks)]
    pools, everything = [], []
    for task in tasks:
        rows = [torch.as_tensor(distribution.rows_of(int(c))) for c in task]
        pools.append(torch.stack([features[r[torch.randperm(len(r), generator=rng)[: args.pool_size]]] for r in rows]))
        everything.append((torch.cat([features[r] for r in rows]), torch.cat([torch.full((len(r),), j) for j, r in enumerate(rows)])))
    pool = torch.stack(pools)  # (tasks, n_way, pool, d)
    labels = torch.arange(args.n_way).repeat_interleave(pool.shape[2]).expand(len(tasks), -1)
    fit = fit_task_heads(pool.flatten(1, 2), labels, args.n_way, steps=args.head_steps, num_targets=1, target_spacing="last", generator=rng)
    heads = fit.targets[:, -1].float()
    with torch.no_grad():
        reconstructed = generator.reconstruct_heads(heads)
    scores = {name: [] for name in ("fitted heads", "VAE reconstructions")}
    for (items, item_labels), head, rebuilt in zip(everything, heads, reconstructed):
        for name, weights in (("fitted heads", head), ("VAE reconstructions", rebuilt)):
            scores[name].append(float((head_logits(weights[None], items[None])[0].argmax(-1) == item_labels).float().mean()))
    error = float((reconstructed - heads).norm() / heads.norm())
    print(f"{len(tasks)} new tasks of the {split} classes, heads fitted as the zoo's, every item of their classes: "
          + ", ".join(f"{name} {100 * sum(v) / len(v):.1f}%" for name, v in scores.items()) + f"; relative reconstruction error {error:.2f}")


if __name__ == "__main__":
    main()
