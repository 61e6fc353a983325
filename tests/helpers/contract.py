"""What every weight generator must do, written once (peft's ``testing_common.py`` style).

A method joins the contract with a :class:`GeneratorCase`: how to build a tiny generator, run it, harvest
its training weights and evaluate it. ``tests/test_contract.py`` runs every check on every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset

from ocd_hf.results import ResultsTable


@dataclass
class GeneratorCase:
    """A method's tiny, seeded instance and the calls the contract needs.

    Attributes:
        name: the method's folder under ``ocd_hf/methods``.
        build: a new generator (seeded: two calls give equal weights).
        run: ``(generator, seed) -> tensor`` — its output on fixed inputs with a seeded sampler.
        output_shape: the shape ``run`` must return.
        load: ``(path_or_repo_id, generator) -> generator`` — ``from_pretrained`` with what it needs.
        harvest: ``(output_dir) -> Dataset`` — its weight dataset, resumable in ``output_dir``.
        evaluate: ``(generator, output_dir) -> ResultsTable`` on held-out data.
        library_tags: tags its card must carry.
        reference_row: the row of ``evaluate``'s table every other row is compared with (the base model for a
            weight-delta generator, logistic regression on the support for a head generator).
        reference_kind: that row's ``kind``.
        method_kind: the ``kind`` of the rows holding the generator's own results.
    """

    name: str
    build: Callable[[], Any]
    run: Callable[[Any, int], torch.Tensor]
    output_shape: tuple[int, ...]
    load: Callable[[str | Path, Any], Any]
    harvest: Callable[[Path], Dataset]
    evaluate: Callable[[Any, Path], ResultsTable]
    library_tags: tuple[str, ...]
    reference_row: str
    reference_kind: str
    method_kind: str


def state_of(generator: Any) -> dict[str, torch.Tensor]:
    """The tensors a generator saves (what ``save_pretrained`` writes to ``model.safetensors``)."""
    return {name: tensor.detach().cpu() for name, tensor in generator.state_dict().items() if not name.startswith("backbone.")}
