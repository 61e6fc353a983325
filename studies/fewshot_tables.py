"""The few-shot benchmark tables of docs/task_generation.md, from the runs of recipes/fewshot_mcdi.py.

Each run directory (one per seed: ``--output-dir``) holds ``<N>way-<K>shot/results-<split>/results.json``
(600 episodes, the same episodes for every row). This script reads them and writes, per shot setting and
split, one markdown table: every row's accuracy per seed (mean ± 95% CI over episodes), its mean ± sd over
seeds, the paired difference to logistic regression (per seed mean ± CI; mean ± sd over seeds) and the
time per task on one thread.

    python studies/fewshot_tables.py /work/runs/wordnet-1shot-s{0,1,2} --title "WordNet" > tables.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from ocd_hf.fewshot import REFERENCE
from ocd_hf.results import ResultsTable

KIND_ORDER = {"baseline": 0, "method": 1, "ablation": 2, "bound": 3}


def find_tables(run_dirs: list[Path]) -> dict[tuple[str, str], list[ResultsTable]]:
    """``{(setting, split): [one table per run]}`` for every setting and split present in every run."""
    found: dict[tuple[str, str], list[ResultsTable]] = defaultdict(list)
    for run in run_dirs:
        for path in sorted(run.glob("*way-*shot/results-*/results.json")):
            found[(path.parent.parent.name, path.parent.name.removeprefix("results-"))].append(ResultsTable.from_json(path))
    return {key: tables for key, tables in found.items() if len(tables) == len(run_dirs)}


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    if len(values) < 2:
        return f"{scale * values[0]:.1f}"
    return f"{scale * statistics.mean(values):.1f} ± {scale * statistics.stdev(values):.1f}"


def markdown(tables: list[ResultsTable], heading: str) -> str:
    """One table: rows in the order baselines, methods, ablations, bounds."""
    names = sorted({row.name: row for row in tables[0].rows}.values(), key=lambda row: KIND_ORDER.get(row.kind, 9))
    seeds = len(tables)
    header = ["row", "kind", *[f"run {i}" for i in range(seeds)], "mean ± sd over runs", f"Δ vs {REFERENCE}, per run",
              "Δ mean ± sd", "ms/task"]
    lines = [f"### {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for template in names:
        rows = [table[template.name] for table in tables]
        accuracy = [f"{100 * r.mean('accuracy'):.1f} ± {100 * r.ci95('accuracy'):.1f}" for r in rows]
        diffs = [r for r in rows if "diff_vs_logistic_regression" in r.values]
        diff_cells = (", ".join(f"{100 * r.mean('diff_vs_logistic_regression'):+.1f} ± {100 * r.ci95('diff_vs_logistic_regression'):.1f}" for r in diffs)
                      if diffs else "")
        diff_mean = mean_sd([r.mean("diff_vs_logistic_regression") for r in diffs]) if diffs else ""
        timing = [r.mean("ms_per_task") for r in rows if "ms_per_task" in r.values]
        name = f"{template.name} †" if template.kind == "bound" else template.name
        cells = [name, template.kind, *accuracy, mean_sd([r.mean("accuracy") for r in rows]), diff_cells, diff_mean,
                 f"{statistics.median(timing):.2f}" if timing else ""]
        lines.append("| " + " | ".join(cells) + " |")
    metadata = tables[0].metadata
    lines += ["", f"{metadata['num_episodes']} episodes per run, {metadata['n_way']}-way {metadata['k_shot']}-shot, "
              f"{metadata['q_queries']} queries per class; accuracy in % (± 95% CI over episodes); ms/task: median over runs, "
              f"{metadata.get('timing_threads', 1)} thread(s), all episodes in one call. † reads the query labels.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (one per seed)")
    parser.add_argument("--title", default="Few-shot heads")
    parser.add_argument("--json", type=Path, default=None, help="also write every table's per-run means here")
    args = parser.parse_args(argv)
    found = find_tables(args.runs)
    if not found:
        raise SystemExit(f"No setting has results.json in every run of {[str(r) for r in args.runs]}.")
    text = "\n".join(markdown(tables, f"{args.title}: {setting}, meta-{split}") for (setting, split), tables in sorted(found.items()))
    if args.json:
        record = {f"{setting}/{split}": [table.to_dict() for table in tables] for (setting, split), tables in sorted(found.items())}
        args.json.write_text(json.dumps({"runs": [str(r) for r in args.runs], "tables": record}, indent=1) + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
