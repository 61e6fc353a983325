"""Command-line options every recipe shares: how OCD itself is configured (delta mode, generator,
conditioning, cross-fitting) and the ``train_hypernetwork`` overrides they map to.

Kept free of HF imports: a recipe may set ``HF_HUB_OFFLINE`` after parsing its arguments.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

# ocd_hf.GENERATOR_TYPES and ocd_hf.CONDITION_COMPONENTS, repeated because importing ocd_hf imports huggingface_hub,
# which reads HF_HUB_OFFLINE once; tests/test_recipes.py checks that the two stay equal.
GENERATORS = ("diffusion", "regression", "label")
CONDITION_COMPONENTS = ("input", "activation", "output")


def threads_per_process(num_processes: int, requested: int | None = None) -> int:
    """torch threads for each of ``num_processes`` processes: ``requested`` (a recipe's option), else the user's
    ``OMP_NUM_THREADS`` (respected, never overridden), else the machine's cores shared out."""
    if requested:
        return requested
    user = os.environ.get("OMP_NUM_THREADS", "")
    if user.isdigit() and int(user) > 0:
        return int(user)
    return max(1, (os.cpu_count() or 1) // num_processes)


def add_ocd_arguments(
    parser: argparse.ArgumentParser,
    fold_models: str,
    generator: str = "diffusion",
    conditioning: list[str] | None = None,
    cross_fit: int | None = None,
) -> None:
    """Add ``--delta-mode``, ``--generator``, ``--conditioning`` and ``--cross-fit`` with a recipe's defaults;
    ``fold_models`` names what cross-fitting retrains per fold (e.g. "classifiers")."""
    parser.add_argument(
        "--delta-mode", choices=("auto", "full", "factorised", "latent"), default="auto",
        help="delta representation (auto: factorised where exact; latent: diffusion in a weight VAE's latent space)"
    )
    parser.add_argument("--generator", choices=GENERATORS, default=generator, help="delta generator (see the README's Generators)")
    parser.add_argument(
        "--conditioning", nargs="+", choices=CONDITION_COMPONENTS, default=conditioning, help="components of I(x) (default: all)"
    )
    parser.add_argument(
        "--cross-fit", type=int, default=cross_fit, metavar="K",
        help=f"harvest out of fold with K {fold_models}, each trained without its fold (0: off; see harvest_deltas)",
    )


def hypernetwork_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``config_overrides`` of ``train_hypernetwork`` from the parsed options."""
    overrides: dict[str, Any] = {"delta_mode": args.delta_mode, "generator_type": args.generator}
    if args.conditioning:
        overrides["condition_components"] = list(args.conditioning)
    return overrides


def cross_fit_folds(args: argparse.Namespace) -> int | None:
    """``--cross-fit`` as ``harvest_deltas`` takes it (``None`` when off)."""
    return args.cross_fit or None
