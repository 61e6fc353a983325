"""Choose the layer OCD should modify: rank candidate ``nn.Linear`` layers by the entropy of the
per-sample loss when only that layer is perturbed (OCD paper, section 3, "Layer selection").

For every candidate, the layer's weight is perturbed ``num_draws`` times (everything else fixed),
each sample's loss is recorded per draw, a 1-D Gaussian KDE is fitted to each sample's losses and
its differential entropy taken; the score is the mean over samples and the highest score wins.
The weight is restored bit for bit after every draw, also when an exception interrupts the run.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...checks import check_writable_dir
from ...finetune import LossFn, per_sample_task_loss
from ...logging import get_logger
from ...target import backbone_task, find_target_linear, linear_layers, model_output_tensor

PERTURBATIONS = ("gaussian", "reinit")
BANDWIDTH_RULES = ("scott", "silverman")
# Upper bound on the elements of one (samples, points, draws) block of kernel evaluations.
_KDE_BLOCK_ELEMENTS = 2**20

Batch = tuple[dict[str, Any], torch.Tensor]
logger = get_logger(__name__)


# --------------------------------------------------------------------------- entropy of a KDE


def bandwidth_factor(n: int, bw_method: str | float = "scott") -> float:
    """``scipy.stats.gaussian_kde``'s bandwidth factor in 1-D for ``n`` points: ``n**(-1/5)`` (Scott),
    ``(3n/4)**(-1/5)`` (Silverman) or a given positive float."""
    if n < 2:
        raise ValueError(f"A KDE needs at least 2 draws per sample, got {n}; raise num_draws.")
    if bw_method == "scott":
        return n ** (-1 / 5)
    if bw_method == "silverman":
        return (3 * n / 4) ** (-1 / 5)
    if isinstance(bw_method, (int, float)) and not isinstance(bw_method, bool) and bw_method > 0:
        return float(bw_method)
    raise ValueError(f"bw_method must be one of {BANDWIDTH_RULES} or a positive float, got {bw_method!r}.")


def kde_bandwidth(values: torch.Tensor, bw_method: str | float = "scott") -> torch.Tensor:
    """Kernel width ``h`` per row of ``values`` ``(rows, n)``, as ``scipy.stats.gaussian_kde`` fits it
    in 1-D: the unbiased standard deviation times :func:`bandwidth_factor`."""
    return values.std(dim=-1, unbiased=True) * bandwidth_factor(values.shape[-1], bw_method)


def kde_min_bandwidth(values: torch.Tensor) -> torch.Tensor:
    """Smallest kernel width per row: float32 resolution at the losses' magnitude.

    Losses that differ by less than this are float noise; a sample whose loss does not move under
    the perturbation gets this width instead of a zero-variance (singular) KDE.
    """
    return torch.finfo(torch.float32).eps * values.abs().amax(dim=-1).clamp_min(1.0)


def _kde_log_density(points: torch.Tensor, centers: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
    """``log p(points)`` ``(rows, m)`` of the KDE with ``centers`` ``(rows, n)`` and widths ``(rows,)``.

    Evaluated in blocks along ``m`` so memory stays bounded for many draws.
    """
    rows, n = centers.shape
    block = max(1, _KDE_BLOCK_ELEMENTS // (rows * n))
    scaled_points = points / bandwidth[:, None]
    scaled_centers = centers / bandwidth[:, None]
    parts = []
    for start in range(0, points.shape[1], block):
        z = scaled_points[:, start : start + block, None] - scaled_centers[:, None, :]
        parts.append(torch.logsumexp(z.square_().mul_(-0.5), dim=-1))
    log_norm = math.log(n) + torch.log(bandwidth * math.sqrt(2 * math.pi))
    return torch.cat(parts, dim=1) - log_norm[:, None]


def _quantile_subsample(values: torch.Tensor, max_points: int) -> torch.Tensor:
    """At most ``max_points`` values per row, one at the middle of each equal-mass stratum of the sorted row."""
    n = values.shape[-1]
    if n <= max_points:
        return values
    index = ((torch.arange(max_points, device=values.device) + 0.5) * n / max_points).long()
    return values.sort(dim=-1).values[:, index]


def kde_entropy(
    values: torch.Tensor, bw_method: str | float = "scott", quadrature_points: int = 8, max_centers: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differential entropy (nats) of a 1-D Gaussian KDE fitted to each row of ``values`` ``(rows, n)``.

    Returns ``(entropy (rows,), degenerate (rows,) bool)``. The KDE is the one
    ``scipy.stats.gaussian_kde(row, bw_method)`` fits. Its entropy
    ``H = -∫ p log p = -(1/n) Σ_i E_{y ~ N(x_i, h²)}[log p(y)]`` is integrated numerically, for all
    rows at once: each kernel's expectation with Gauss–Hermite quadrature (``log p`` is smooth; 8
    nodes agree with adaptive quadrature to ~2e-3 nats), the mean over kernels on at most
    ``max_centers`` kernels taken at the quantile midpoints of the row (exact up to
    ``max_centers`` draws; ≈5e-3 nats off at 1 000). Cost: ``rows · min(n, max_centers) · quadrature_points · n`` kernel
    evaluations, linear in the number of draws beyond ``max_centers``.

    A degenerate row (zero variance: the loss did not move) has no finite KDE entropy; its width is
    floored at :func:`kde_min_bandwidth`, which gives a very low but finite entropy (≈ -14.5 nats
    for losses of order 1), and it is flagged in ``degenerate``.
    """
    if values.dim() != 2:
        raise ValueError(f"values must have shape (rows, draws), got {tuple(values.shape)}.")
    x = values.detach().to(torch.float64)
    bandwidth = kde_bandwidth(x, bw_method)
    floor = kde_min_bandwidth(x)
    degenerate = bandwidth < floor
    bandwidth = torch.maximum(bandwidth, floor)
    nodes, weights = np.polynomial.hermite.hermgauss(quadrature_points)
    nodes = torch.as_tensor(nodes, dtype=x.dtype, device=x.device)
    weights = torch.as_tensor(weights / math.sqrt(math.pi), dtype=x.dtype, device=x.device)
    kernels = _quantile_subsample(x, max_centers)
    points = kernels[:, :, None] + math.sqrt(2.0) * bandwidth[:, None, None] * nodes
    log_density = _kde_log_density(points.reshape(x.shape[0], -1), x, bandwidth).reshape(points.shape)
    entropy = -(log_density * weights).sum(-1).mean(-1)
    return entropy, degenerate


# --------------------------------------------------------------------------- the ranking


@dataclass
class LayerScore:
    """One candidate layer: its loss-entropy score (mean and std over samples, nats)."""

    name: str
    shape: tuple[int, int]
    mean_entropy: float
    std_entropy: float
    num_degenerate: int
    position: int


@dataclass
class LayerRanking:
    """Candidate layers sorted by mean loss entropy, highest (the selected layer) first."""

    rows: list[LayerScore]
    perturbation: str
    noise_scale: float | None
    num_draws: int
    num_samples: int
    seed: int
    bw_method: str | float
    elapsed_seconds: float
    criterion: str = field(
        default="maximal mean entropy of the per-sample loss under perturbation of the layer alone "
        "(OCD, Lutati & Wolf 2023, eq. 3)"
    )

    @property
    def best(self) -> str:
        """Full name of the selected layer (the highest mean entropy)."""
        return self.rows[0].name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> Path:
        """Write the ranking as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "LayerRanking":
        """Read a ranking written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text())
        rows = [LayerScore(**{**row, "shape": tuple(row["shape"])}) for row in data.pop("rows")]
        return cls(rows=rows, **data)

    def to_markdown(self) -> str:
        """A Markdown table of the ranking with the settings it was computed with."""
        noise = f", noise scale {self.noise_scale}" if self.perturbation == "gaussian" else ""
        lines = [
            f"Layer selection by loss entropy: {self.perturbation} perturbation{noise}, "
            f"{self.num_draws} draws × {self.num_samples} samples, KDE bandwidth {self.bw_method}, "
            f"seed {self.seed}, {self.elapsed_seconds:.1f} s.",
            f"Criterion: {self.criterion}. Selected: `{self.best}`.",
            "",
            "| rank | layer | shape (out, in) | mean entropy (nats) | std over samples | degenerate samples |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for rank, row in enumerate(self.rows, 1):
            lines.append(
                f"| {rank} | `{row.name}` | {row.shape[0]} × {row.shape[1]} | {row.mean_entropy:.4f} "
                f"| {row.std_entropy:.4f} | {row.num_degenerate} |"
            )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """Bar chart of the mean entropy per layer in model order, selected layer highlighted (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = sorted(self.rows, key=lambda row: row.position)
        figure = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2.0), 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        colors = ["tab:red" if row.name == self.best else "tab:blue" for row in rows]
        axes.bar(
            range(len(rows)),
            [row.mean_entropy for row in rows],
            yerr=[row.std_entropy for row in rows],
            color=colors,
            capsize=3,
        )
        axes.set_xticks(range(len(rows)), [row.name for row in rows], rotation=90, fontsize=7)
        axes.set_ylabel("mean loss entropy (nats) ± std over samples")
        axes.set_title(f"Layer selection ({self.perturbation}, {self.num_draws} draws): {self.best}", fontsize=9)
        axes.axhline(0.0, color="black", linewidth=0.5)
        path = Path(path)
        figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
        return path

    def save(self, output_dir: str | Path) -> Path:
        """Write ``ranking.json``, ``ranking.md`` and ``ranking.png`` to ``output_dir``."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.to_json(output_dir / "ranking.json")
        (output_dir / "ranking.md").write_text(self.to_markdown())
        self.plot(output_dir / "ranking.png")
        return output_dir


# --------------------------------------------------------------------------- inputs and candidates


def _slice_batch(inputs: Mapping[str, Any], batch_size: int, take: int, device: torch.device) -> dict[str, Any]:
    """The first ``take`` samples of every batched tensor input, moved to ``device``."""
    sliced = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            if value.dim() > 0 and value.shape[0] == batch_size:
                value = value[:take]
            value = value.to(device)
        sliced[key] = value
    return sliced


def collect_batches(
    batches_or_inputs: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    labels: torch.Tensor | Iterable[torch.Tensor] | None,
    num_samples: int | None,
    device: torch.device,
) -> list[Batch]:
    """Turn one dict of inputs or an iterable of batches into ``(inputs, labels)`` pairs on ``device``,
    holding the first ``num_samples`` samples (all if ``None``).

    Labels come from ``labels`` (a tensor for one dict, an iterable of tensors for batches) or from
    each batch's ``"labels"`` key.
    """
    if isinstance(batches_or_inputs, Mapping):
        batches: Iterable[Mapping[str, Any]] = [batches_or_inputs]
        label_batches: Iterable[torch.Tensor | None] = [labels]
    else:
        batches = batches_or_inputs
        if isinstance(labels, torch.Tensor):
            raise ValueError(
                "With an iterable of batches, pass labels as an iterable of tensors (one per batch) "
                "or in each batch's 'labels' key."
            )
        label_batches = labels if labels is not None else itertools.repeat(None)
    collected: list[Batch] = []
    remaining = num_samples if num_samples is not None else math.inf
    for batch, batch_labels in zip(batches, label_batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"Each batch must be a dict of model inputs, got {type(batch).__name__}.")
        inputs = dict(batch)
        in_batch_labels = inputs.pop("labels", None)
        batch_labels = batch_labels if batch_labels is not None else in_batch_labels
        if batch_labels is None:
            raise ValueError("No labels: pass labels= or include a 'labels' key in each batch of inputs.")
        batch_labels = torch.as_tensor(batch_labels)
        batch_size = batch_labels.shape[0]
        take = int(min(batch_size, remaining))
        collected.append((_slice_batch(inputs, batch_size, take, device), batch_labels[:take].to(device)))
        remaining -= take
        if remaining <= 0:
            break
    if not collected or sum(pair[1].shape[0] for pair in collected) == 0:
        raise ValueError("No samples to evaluate: pass at least one batch with at least one sample.")
    return collected


def called_linear_layers(backbone: nn.Module, inputs: Mapping[str, Any]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``backbone`` that its forward pass on ``inputs`` calls, in model order."""
    layers = linear_layers(backbone)
    called: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda module, args, output, name=name: called.add(name))
        for name, layer in layers.items()
    ]
    try:
        with torch.no_grad():
            backbone(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: layer for name, layer in layers.items() if name in called}


def resolve_candidates(
    backbone: nn.Module, candidates: Sequence[str] | None, inputs: Mapping[str, Any]
) -> dict[str, nn.Linear]:
    """Candidate layers by full name: every Linear the forward calls, or ``candidates`` resolved with
    :func:`~ocd_hf.target.find_target_linear` (exact name, dotted suffix or regex)."""
    called = called_linear_layers(backbone, inputs)
    if candidates is None:
        if not called:
            raise ValueError(f"{type(backbone).__name__}'s forward pass calls no nn.Linear layer: nothing to select.")
        return called
    if isinstance(candidates, str):
        candidates = [candidates]
    resolved = dict(find_target_linear(backbone, candidate) for candidate in candidates)
    not_called = [name for name in resolved if name not in called]
    if not_called:
        raise ValueError(
            f"Candidate layer(s) {not_called} are not called in the forward pass of {type(backbone).__name__}, so "
            f"perturbing them cannot change the loss. Layers that are called: {list(called)}."
        )
    return resolved


# --------------------------------------------------------------------------- perturbations


Perturbation = Callable[[torch.Tensor], torch.Tensor]


def gaussian_perturbation(layer: nn.Linear, noise_scale: float) -> Perturbation:
    """``W + noise_scale · std(W) · N(0, I)``: additive noise scaled to the layer's own weight spread."""
    scale = noise_scale * layer.weight.detach().float().std().item()
    if scale == 0.0 and noise_scale > 0:
        logger.warning(f"The weight of this {layer} has zero std: Gaussian noise scaled to it is zero.")
    return lambda weight: weight + scale * torch.randn_like(weight)


def reinit_perturbation(backbone: nn.Module, layer: nn.Linear) -> Perturbation:
    """A freshly initialised weight of the layer's shape, as the official OCD code perturbs.

    Draws from ``backbone._init_weights`` (a ``transformers`` model's init, e.g. N(0, initializer_range))
    applied to a scratch ``nn.Linear``, else from ``nn.Linear.reset_parameters`` (Kaiming uniform).
    A scratch layer is used because ``transformers`` skips re-initialising loaded weights.
    """
    weight = layer.weight
    scratch = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    init_weights = getattr(backbone, "_init_weights", None)

    def perturb(_: torch.Tensor) -> torch.Tensor:
        scratch.reset_parameters()
        if callable(init_weights):
            init_weights(scratch)
        return scratch.weight.detach()

    return perturb


@contextlib.contextmanager
def replaced_weight(layer: nn.Linear, new_weight: torch.Tensor) -> Iterator[None]:
    """Put ``new_weight`` into ``layer.weight`` in place; restore the original bit for bit on exit,
    whatever happens inside the block."""
    with torch.no_grad():
        original = layer.weight.detach().clone()
        layer.weight.copy_(new_weight)
        try:
            yield
        finally:
            layer.weight.copy_(original)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for the block, leaving the caller's RNG state untouched afterwards."""
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [], device_type=device.type if accelerator else "cuda"):
        torch.manual_seed(seed)
        yield


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, so a layer's draws do not depend on which other candidates are ranked."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


# --------------------------------------------------------------------------- selection


def _sample_losses(backbone: nn.Module, batches: list[Batch], loss_fn: LossFn) -> torch.Tensor:
    """Per-sample losses ``(num_samples,)`` of the backbone as it is now, one forward per batch."""
    losses = []
    for inputs, labels in batches:
        batch_losses = loss_fn(model_output_tensor(backbone(**inputs)), labels)
        if batch_losses.shape != labels.shape[:1]:
            raise ValueError(
                f"loss_fn must return one loss per sample, shape ({labels.shape[0]},); got {tuple(batch_losses.shape)}. "
                "Use reduction='none'."
            )
        losses.append(batch_losses.detach().to("cpu", torch.float64))
    return torch.cat(losses)


def _draw_losses(
    backbone: nn.Module,
    name: str,
    layer: nn.Linear,
    batches: list[Batch],
    loss_fn: LossFn,
    perturb: Perturbation,
    num_draws: int,
    progress_bar: tqdm,
) -> torch.Tensor:
    """Losses ``(num_draws, num_samples)`` with only ``layer`` perturbed, restored after every draw."""
    original = layer.weight.detach().clone()
    draws = []
    for _ in range(num_draws):
        with replaced_weight(layer, perturb(original)):
            draws.append(_sample_losses(backbone, batches, loss_fn))
        progress_bar.update(1)
    losses = torch.stack(draws)
    if not torch.isfinite(losses).all():
        raise ValueError(
            f"Perturbing {name!r} gave non-finite losses; lower noise_scale or use perturbation='gaussian'."
        )
    return losses


def select_layer(
    backbone: nn.Module,
    batches_or_inputs: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    labels: torch.Tensor | Iterable[torch.Tensor] | None = None,
    candidates: Sequence[str] | None = None,
    *,
    num_draws: int = 64,
    num_samples: int | None = 64,
    perturbation: str = "gaussian",
    noise_scale: float = 0.1,
    bw_method: str | float = "scott",
    loss_fn: LossFn | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    progress: bool = True,
) -> LayerRanking:
    """Rank ``nn.Linear`` layers of ``backbone`` by the entropy of the loss under perturbation.

    The OCD paper (section 3, following Lutati & Wolf 2021): "The layer that yields the highest
    entropy score when perturbed is a natural candidate for a fine-tuning algorithm, since a large
    entropy reflects that, near the layer's base parameters, the surface imposed by the loss
    function has a large variance." and "The layer that obtains the highest mean entropy is
    selected." So ``ranking.best`` is the layer with the *highest* mean entropy.

    Args:
        backbone: the trained model; it is run in eval mode under ``no_grad`` and left unchanged.
        batches_or_inputs: one dict of batched model inputs, or an iterable of such dicts
            (e.g. a ``DataLoader``); the first ``num_samples`` samples are used.
        labels: a tensor for one dict, an iterable of tensors for batches, or ``None`` to read
            each batch's ``"labels"`` key.
        candidates: layer names (exact, dotted suffix or regex, see
            :func:`~ocd_hf.target.find_target_linear`); default: every Linear the forward calls.
        num_draws: perturbations per layer (the paper uses 10 000; at least 2).
        num_samples: samples scored per draw (``None``: all given).
        perturbation: ``"gaussian"`` (``W + noise_scale·std(W)·N(0, I)``) or ``"reinit"`` (a fresh
            initialisation of the weight, as the official OCD code does). Only the weight moves.
        noise_scale: Gaussian noise relative to the layer's weight std.
        bw_method: KDE bandwidth rule, as in ``scipy.stats.gaussian_kde``.
        loss_fn: ``(model_output, labels) -> (batch,)`` losses; default: the backbone task's loss.
        seed: seeds the draws (per layer); the caller's RNG state is preserved.
        output_dir: if given, write ``ranking.json``, ``ranking.md`` and ``ranking.png`` there.
        progress: show a progress bar over candidates × draws.

    Cost: ``len(candidates) · num_draws`` forward passes over the selected samples (one per batch).
    """
    start = time.perf_counter()
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}.")
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 to fit a KDE, got {num_draws}.")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer or None (all samples), got {num_samples}.")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}.")
    bandwidth_factor(num_draws, bw_method)
    if output_dir is not None:
        check_writable_dir(output_dir)
    loss_fn = loss_fn or per_sample_task_loss(backbone_task(backbone))
    device = next(backbone.parameters()).device
    batches = collect_batches(batches_or_inputs, labels, num_samples, device)
    sample_count = sum(batch_labels.shape[0] for _, batch_labels in batches)
    positions = {name: index for index, name in enumerate(linear_layers(backbone))}

    was_training = backbone.training
    backbone.eval()
    scores = []
    try:
        with torch.no_grad():
            layers = resolve_candidates(backbone, candidates, batches[0][0])
            with tqdm(total=len(layers) * num_draws, desc="layer selection", unit="draw", disable=not progress) as bar:
                for name, layer in layers.items():
                    bar.set_postfix_str(name)
                    perturb = (
                        gaussian_perturbation(layer, noise_scale)
                        if perturbation == "gaussian"
                        else reinit_perturbation(backbone, layer)
                    )
                    with _seeded(_layer_seed(seed, name), device):
                        losses = _draw_losses(backbone, name, layer, batches, loss_fn, perturb, num_draws, bar)
                    entropy, degenerate = kde_entropy(losses.T, bw_method)
                    scores.append(
                        LayerScore(
                            name=name,
                            shape=(layer.out_features, layer.in_features),
                            mean_entropy=entropy.mean().item(),
                            std_entropy=entropy.std().item() if sample_count > 1 else 0.0,
                            num_degenerate=int(degenerate.sum()),
                            position=positions[name],
                        )
                    )
    finally:
        backbone.train(was_training)

    ranking = LayerRanking(
        rows=sorted(scores, key=lambda row: (-row.mean_entropy, row.position)),
        perturbation=perturbation,
        noise_scale=noise_scale if perturbation == "gaussian" else None,
        num_draws=num_draws,
        num_samples=sample_count,
        seed=seed,
        bw_method=bw_method,
        elapsed_seconds=time.perf_counter() - start,
    )
    if output_dir is not None:
        ranking.save(output_dir)
    return ranking
