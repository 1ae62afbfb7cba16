"""Plot how a saved MoR or MiLoRA adapter routes a data set: a layers x experts heatmap and per-task
bars (like MiLoRA's Fig. 2 and MoR's Fig. 7), plus the statistics as JSON.

    python examples/plot_routing.py examples/output/train/adapter --out examples/output/routing
    python examples/plot_routing.py ADAPTER --data my.jsonl --modules gate_proj --layer -1

``--data`` as in ``examples/train.py`` (``multitask`` or JSON lines with ``prompt``, ``completion``,
``task``); the held-out rows are used. MoR's statistics are per token (each adapted linear layer has its
router), MiLoRA's per prompt (one router per block). See :mod:`loramix.analysis`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import load  # noqa: E402
from loramix.analysis import plot_routing_heatmap, plot_task_bars, router_statistics, summarize  # noqa: E402
from train import Collator, encode, load_rows  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path)
    p.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    p.add_argument("--data", default="multitask")
    p.add_argument("--out", type=Path, default=Path("examples/output/routing"))
    p.add_argument("--value", choices=["usage", "mean_prob"], default="usage", help="what the heatmap shows")
    p.add_argument("--modules", nargs="*", default=None, help="MoR: keep only layers containing these names")
    p.add_argument("--layer", default="-1", help="layer of the per-task bars: index, name, or 'mean'")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def plot_examples(model, tokenizer, examples, out_dir: Path, batch_size: int = 16, copy_to: Path | None = None) -> dict:
    """Routing statistics and plots of ``model`` on ``examples`` (``multitask_data.Example`` objects or
    ``{"prompt", "completion", "task"}`` rows), written to ``out_dir``; the quickstart calls this.

    ``copy_to``: also copy the per-task bar chart there (the README's figure). Returns the paths and a
    summary (mean entropy and balance over layers).
    """
    import shutil

    chunks = [list(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    if chunks and not isinstance(chunks[0][0], dict):  # multitask_data.Example: the quickstart's own prompts
        from multitask_data import collate as collate_examples

        batches = [{**collate_examples(tokenizer, chunk), "task": [ex.task for ex in chunk]} for chunk in chunks]
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collate = Collator(pad, keep_task=True)
        batches = [collate([encode(tokenizer, row) for row in chunk]) for chunk in chunks]
    stats = router_statistics(model, batches)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "routing.json").write_text(json.dumps(stats))
    outputs = {
        "stats": out_dir / "routing.json",
        "heatmap": plot_routing_heatmap(stats, out_dir / "routing_heatmap.png"),
    }
    if stats["tasks"]:
        outputs["tasks"] = plot_task_bars(stats, out_dir / "routing_tasks.png", layer=-1)
        if copy_to is not None:
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(outputs["tasks"], copy_to)
            outputs["copy"] = copy_to
    return {**{k: str(v) for k, v in outputs.items()}, "summary": summarize(stats)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.adapter, args.model)
    _, rows = load_rows(args.data, args.seed)
    pad = tokenizer.pad_token_id
    collate = Collator(pad, keep_task=True)
    encoded = [encode(tokenizer, row) for row in rows]
    batches = [collate(encoded[i : i + args.batch_size]) for i in range(0, len(encoded), args.batch_size)]
    stats = router_statistics(model, batches)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(stats))
    heatmap = plot_routing_heatmap(stats, args.out / "routing_heatmap.png", value=args.value, modules=args.modules)
    layer = args.layer if args.layer == "mean" or not args.layer.lstrip("-").isdigit() else int(args.layer)
    outputs = {"stats": str(args.out / "routing.json"), "heatmap": str(heatmap)}
    if stats["tasks"]:
        outputs["tasks"] = str(plot_task_bars(stats, args.out / "routing_tasks.png", layer=layer))
    print(json.dumps({**outputs, "summary": summarize(stats)}, indent=1))
    return outputs


if __name__ == "__main__":
    main()
