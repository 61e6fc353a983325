"""Combine the per-seed tables of the latent-delta measurement (recipe runs into one output dir) into
latent_per_token.json (next to this script's working directory) and print the markdown tables of
docs/when_ocd_helps.md ("Latent deltas for the per-token layer").

    python studies/latent_summary.py outputs/latent_study <summary.json of each run>...
"""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
summaries = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]
targets = {"head": "head", "per_token": "body-encoder-layer-5-output-dense"}
seeds = sorted(
    int(p.name.split("-")[1]) for p in out.glob("seed-*") if (p / targets["per_token"] / "evaluation" / "results.json").is_file()
)
records = {"seeds": seeds, "tables": {}, "reconstruction": {}, "timings_seconds": {}, "budgets": {}}
for summary in summaries:
    records["reconstruction"].update(summary["reconstruction"])
    records["timings_seconds"].update(summary["timings_seconds"])
    records["budgets"].update(summary["budgets"])
def values(table, row, metric):
    for r in table["rows"]:
        if r["name"] == row:
            return r["metrics"][metric]["values"][0]
    return None
for key, slug in targets.items():
    per_seed = {}
    for seed in seeds:
        table = json.loads((out / f"seed-{seed}" / slug / "evaluation" / "results.json").read_text())
        per_seed[seed] = {row["name"]: {m: v["values"][0] for m, v in row["metrics"].items()} for row in table["rows"]}
        per_seed[seed]["_num_examples"] = table["metadata"]["num_examples"]
    records["tables"][key] = per_seed
Path("latent_per_token.json").write_text(json.dumps(records, indent=1) + "\n")
def ms(xs, scale=100.0, digits=1):
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"
def pm(xs, scale=100.0, digits=1):
    xs = [x * scale for x in xs]
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):+.{digits}f} ± {sd:.{digits}f}"
lines = [
    "| target | row | generator | accuracy (%) | Δ accuracy (points) | balanced accuracy (%) | Δ balanced (points) | cross-entropy | Δ cross-entropy |",
    "|---|---|---|---|---|---|---|---|---|",
]
names = {"head": "`head` (384 → 2)", "per_token": "`body.encoder.layer.5.output.dense` (384×1536, per token)"}
gens = {"head": "label (the recipe default)", "per_token": "latent diffusion"}
for key, per_seed in records["tables"].items():
    for row in [r for r in per_seed[seeds[0]] if not r.startswith("_")]:
        if row == "nearest_neighbour":
            continue
        acc = [per_seed[s][row]["accuracy"] for s in seeds]
        base = [per_seed[s]["base"]["accuracy"] for s in seeds]
        ce = [per_seed[s][row].get("cross_entropy") for s in seeds]
        bce = [per_seed[s]["base"]["cross_entropy"] for s in seeds]
        dag = "—" if row in ("base", "majority_class") else pm([a - b for a, b in zip(acc, base)])
        bal = [per_seed[s][row]["balanced_accuracy"] for s in seeds]
        bbal = [per_seed[s]["base"]["balanced_accuracy"] for s in seeds]
        dbal = "—" if row in ("base", "majority_class") else pm([a - b for a, b in zip(bal, bbal)])
        cec = "—" if ce[0] is None else ms(ce, 1.0, 4)
        dce = "—" if ce[0] is None or row == "base" else pm([a - b for a, b in zip(ce, bce)], 1.0, 4)
        mark = " †" if row in ("oracle", "label_free") else ""
        gen = gens[key] if row == "ocd_1" else ""
        lines.append(f"| {names[key]} | {row}{mark} | {gen} | {ms(acc)} | {dag} | {ms(bal)} | {dbal} | {cec} | {dce} |")
lines += [
    "",
    "| deltas | n per seed | base accuracy (%) | with the harvested Δ (%) | with the VAE's reconstruction (%) | "
    "CE base / harvested / reconstructed | cosine | relative error |",
    "|---|---|---|---|---|---|---|---|",
]
for split in ("held_out", "training"):
    reps = [records["reconstruction"][f"seed-{s}/body.encoder.layer.5.output.dense"][split] for s in seeds]
    ce = " / ".join(ms([r[n]["cross_entropy"] for r in reps], 1.0, 3) for n in ("base", "harvested", "reconstructed"))
    lines.append(f"| {split} | {reps[0]['num_examples']} | {ms([r['base']['accuracy'] for r in reps])} | {ms([r['harvested']['accuracy'] for r in reps])} | "
                 f"{ms([r['reconstructed']['accuracy'] for r in reps])} | {ce} | {ms([r['cosine'] for r in reps], 1.0, 3)} | "
                 f"{ms([r['relative_error'] for r in reps], 1.0, 3)} |")
print("\n".join(lines))
print({k: round(v) for k, v in records["timings_seconds"].items()})
