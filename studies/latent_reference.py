"""What the 500 harvested labels buy without OCD: logistic regression on the frozen SetFit embeddings of the harvested
texts (the head deltas' layer_input), scored on the same 1000 test texts, per seed (docs/when_ocd_helps.md,
"Latent deltas for the per-token layer").

    PYTHONPATH=recipes python studies/latent_reference.py outputs/latent_study 0 1 2
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from data import load_text_classification, seeded_subset, sort_by_length
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from transformers import AutoTokenizer

from ocd_hf import SetFitBackbone, load_deltas

torch.set_num_threads(1)
out, seeds = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
_, test = load_text_classification(None, None, None)
test = sort_by_length(seeded_subset(test, 1000, seed=0))
results = {}
for seed in seeds:
    backbone = SetFitBackbone.from_pretrained(out / f"seed-{seed}" / "backbone").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / f"seed-{seed}" / "backbone")
    rows = load_deltas(out / f"seed-{seed}" / "head" / "deltas").with_format("numpy")
    x, y = np.asarray(rows["layer_input"]), np.asarray(rows["label"])
    head = dict(backbone.named_modules())["head"]
    captured = []
    hook = head.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    with torch.no_grad():
        for start in range(0, len(test), 32):
            backbone(**backbone.tokenize(test["text"][start:start + 32], tokenizer))
    hook.remove()
    test_x, test_y = torch.cat(captured).numpy(), np.asarray(test["label"])
    clf = LogisticRegression(max_iter=2000).fit(x, y)
    pred = clf.predict(test_x)
    results[seed] = {"accuracy": float((pred == test_y).mean()), "balanced_accuracy": float(balanced_accuracy_score(test_y, pred)),
                     "num_train": int(len(y)), "num_test": int(len(test_y))}
    print(seed, results[seed], flush=True)
Path("latent_reference.json").write_text(json.dumps(results, indent=1) + "\n")
