"""D2NWG end to end on synthetic few-shot tasks, next to the baselines on the same episodes (a CPU-minutes check of
the library pieces, not a benchmark): classes are Gaussian clusters in ``--dim`` dimensions; heads are harvested on
tasks of the meta-train classes (the last ``--checkpoints`` checkpoints of each), D2NWG's three stages are trained,
and heads are generated for episodes of unseen classes.

    python studies/d2nwg_synthetic.py --n-way 5 --k-shot 1 --seed 0

Rows: one generated head (``d2nwg``), the draw with the lowest support loss among ``--samples`` (deployable), the
mean accuracy over the draws, and † the mean of the best 3 draws ranked by *query* accuracy (the paper's protocol:
it reads the test labels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from ocd_hf.episodes import Episode, EpisodeSampler, TaskDistribution
from ocd_hf.fewshot import episode_accuracy, evaluate_episodes
from ocd_hf.methods.d2nwg import select_heads, train_d2nwg
from ocd_hf.task_heads import harvest_task_heads

COMPONENTS = {
    "vae_config": {"latent_size": 16, "hidden_size": 128, "num_layers": 2}, "projection_size": 32,
    "encoder_config": {"code_size": 64, "hidden_size": 64, "num_heads": 2, "num_inducing": 8, "num_layers": 1},
    "denoiser_config": {"hidden_size": 128, "num_layers": 3, "num_heads": 4, "intermediate_size": 256},
}


def gaussian_classes(num_classes: int, per_class: int, dim: int, seed: int) -> TaskDistribution:
    """Item = class mean (N(0, I)) + N(0, I)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    embeddings = rng.normal(size=(num_classes, dim))[labels] + rng.normal(size=(len(labels), dim))
    return TaskDistribution(Dataset.from_dict({"embedding": embeddings.astype(np.float32), "label": labels}), name="gaussian")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--k-shot", type=int, default=1)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--train-classes", type=int, default=150, help="meta-train classes (50 more are the meta-test classes)")
    parser.add_argument("--tasks", type=int, default=512, help="meta-train tasks harvested")
    parser.add_argument("--checkpoints", type=int, default=3, help="E, last checkpoints per task")
    parser.add_argument("--steps", type=int, default=1500, help="diffusion steps (VAE: 2/3 of it, alignment: 1/3)")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--joint-encoder", action="store_true", help="train the encoder with the denoiser")
    parser.add_argument("--alignment-steps", type=int, default=None, help="default: 1/3 of --steps; 0 skips alignment (needs --joint-encoder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    classes = args.train_classes
    split = gaussian_classes(classes + 50, 20, args.dim, args.seed).class_split({"train": range(classes), "test": range(classes, classes + 50)})
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="d2nwg-synthetic-"))
    start = time.perf_counter()
    harvest_task_heads(split["train"], root / "zoo", num_tasks=args.tasks, n_way=args.n_way, k_shot=args.k_shot, fit_on="pool", pool_size=10,
                       steps=100, lr=0.05, num_targets=args.checkpoints, target_spacing="last", batch_size=256, seed=args.seed, progress=False)
    model = train_d2nwg(root / "zoo", root / "generator", distribution=split["train"], config_overrides=COMPONENTS,
                        vae_steps=2 * args.steps // 3, num_steps=args.steps, joint_encoder=args.joint_encoder,
                        alignment_steps=args.steps // 3 if args.alignment_steps is None else args.alignment_steps, batch_size=64, learning_rate=2e-3,
                        vae_learning_rate=3e-3, alignment_learning_rate=3e-3, validation_fraction=0.0, ema_decay=0.999, seed=args.seed,
                        progress=False)
    print(f"harvest + training: {time.perf_counter() - start:.0f} s")
    episodes = EpisodeSampler(split["test"], args.n_way, args.k_shot, q_queries=15, seed=args.seed + 1).sample(args.episodes, column="embedding")

    def draws(support: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.generate_heads(support, labels, num_samples=args.samples, generator=torch.Generator().manual_seed(args.seed))

    def one(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        return model.generate_heads(support, labels, generator=torch.Generator().manual_seed(args.seed))[:, 0]

    def support_loss(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        return select_heads(draws(support, labels), support, labels, "support_loss")[:, 0]

    seen = EpisodeSampler(split["train"], args.n_way, args.k_shot, q_queries=15, seed=args.seed + 1).sample(args.episodes, column="embedding")
    print(f"one draw on episodes of the meta-train classes: {float(episode_accuracy(one(seen.support, seen.support_labels, args.n_way), seen).mean()):.4f}")
    def query_top3(batch: Episode) -> torch.Tensor:  # † reads the query labels: an oracle row of evaluate_episodes, always a bound
        return select_heads(draws(batch.support, batch.support_labels), batch.support, batch.support_labels, "query_topk", query=batch.query,
                            query_labels=batch.query_labels, top_k=3)

    fitters = {"d2nwg": one, f"d2nwg_support_loss_of_{args.samples}": support_loss,
               f"d2nwg_mean_of_{args.samples}": lambda support, labels, n_way: draws(support, labels)}  # S heads: their mean accuracy
    top = f"d2nwg_top3_of_{args.samples}_by_query"
    table = evaluate_episodes(episodes, fitters, oracle_fitters={top: query_top3}, include_bound=False,
                              descriptions={top: "best 3 draws ranked by QUERY accuracy (uses test labels)"},
                              title=f"D2NWG on Gaussian classes, {args.n_way}-way {args.k_shot}-shot")
    print(table.to_markdown())


if __name__ == "__main__":
    main()
