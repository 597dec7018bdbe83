"""Exact match of a Q&A fine-tuned checkpoint on its training and its held-out questions (JSON).

The training run holds out `data.val_fraction` of the records (seeded by `data_seed`, default
`seed`); this recomputes the same split and scores greedy answers on both sides, so the README's
Q&A figures can be checked against a checkpoint:

    python benchmarks/qa.py --ckpt outputs/<date>/<time>/checkpoints/last.ckpt \
        --data examples/qa_tiny.json
"""

from __future__ import annotations

import argparse
import json

from tinyllm.checkpoint import load_checkpoint, read_checkpoint
from tinyllm.data.qa import exact_match, greedy_answer, load_qa_records, split_prompt, split_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", default="examples/qa_tiny.json")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1337, help="the run's data_seed (default: seed)")
    ap.add_argument("--show", type=int, default=3, help="print this many answers of each split")
    args = ap.parse_args()

    model, tok = load_checkpoint(args.ckpt)
    template = read_checkpoint(args.ckpt)["hyper_parameters"].get("chat_template")
    train, val = split_records(load_qa_records(args.data), args.val_fraction, seed=args.seed)
    out: dict = {"ckpt": args.ckpt, "train_records": len(train), "val_records": len(val)}
    for name, recs in (("train", train), ("val", val)):
        out[f"{name}_exact_match"] = exact_match(model, tok, recs, template)
        samples = []
        for rec in recs[: args.show]:
            prompt, ref = split_prompt(rec)
            pred, _ = greedy_answer(model, tok, prompt, template, max_new_tokens=48)
            samples.append({"question": prompt[-1]["content"], "answer": pred, "reference": ref})
        out[f"{name}_samples"] = samples
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
