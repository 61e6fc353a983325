"""Mc-Di's samplers side by side on saved runs of recipes/fewshot_mcdi.py: the paper's full deterministic chain
(T denoiser calls) against the few-step sampler (``num_inference_steps``), accuracy and time per task on one
thread, on the recipe's own fixed episodes of one split (meta-val to choose; meta-test read once after).

Each run directory gets ``<N>way-<K>shot/results-<split>-samplers/results.{json,md}``; studies/fewshot_tables.py
aggregates them over seeds like the recipe's own tables.

    PYTHONPATH=recipes python studies/mcdi_samplers.py /work/runs/wordnet-1shot-s{0,1,2} --shots 1 --split val --steps 3 6 21
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--output-dir of recipes/fewshot_mcdi.py runs")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--split", default="val", help="val (to choose), test (once, after), or a cross-domain split")
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 6, 21], help="num_inference_steps of the few-step rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    args = parser.parse_args(argv)

    import json

    import torch
    from fewshot_mcdi import generated, load_splits

    from ocd_hf import McDiHeadGenerator, evaluate_episodes

    torch.set_num_threads(args.threads)
    for run in args.runs:
        recipe_args = argparse.Namespace(**json.loads((run / "summary.json").read_text())["args"])
        recipe_args.output_dir = str(run)
        splits, _ = load_splits(recipe_args)
        episodes = splits.benchmark_episodes(recipe_args.n_way, args.shots, recipe_args.queries, recipe_args.episodes, column="embedding")[args.split]
        root = run / f"{recipe_args.n_way}way-{args.shots}shot"
        generator = McDiHeadGenerator.from_pretrained(root / "generator")
        segments = len(set(generator.config.boundaries))
        fitters = {"mcdi": generated(generator, recipe_args.seed)}
        descriptions = {"mcdi": f"Mc-Di, the paper's deterministic chain ({generator.config.num_timesteps} denoiser calls)"}
        for steps in args.steps:
            fitters[f"mcdi_steps{steps}"] = generated(generator, recipe_args.seed, num_inference_steps=steps)
            descriptions[f"mcdi_steps{steps}"] = f"Mc-Di, the few-step sampler: {steps} denoiser calls ({steps // segments} per segment)"
        table = evaluate_episodes(
            episodes, fitters, kinds=dict.fromkeys(fitters, "method"), descriptions=descriptions, include_bound=False,
            output_dir=root / f"results-{args.split}-samplers",
            title=f"Mc-Di samplers, {recipe_args.n_way}-way {args.shots}-shot, {args.split} classes (seed {recipe_args.seed})",
        )
        print(table.to_markdown(), flush=True)


if __name__ == "__main__":
    main()
