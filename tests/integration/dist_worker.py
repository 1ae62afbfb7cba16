"""One process of the 2-process CPU runs in ``test_distributed.py`` (not a test module itself).

    accelerate launch --multi_gpu --num_processes 2 tests/integration/dist_worker.py ddp OUT METHOD...
    python -m torch.distributed.run --nproc_per_node 2 tests/integration/dist_worker.py fsdp2 OUT METHOD...

``ddp``: ``transformers.Trainer`` (``use_cpu=True``) under ``accelerate``: DistributedDataParallel over
gloo; each rank gets other rows of the data. Afterwards the adapter parameters of every rank are
gathered and compared, rank 0 saves the adapter and writes ``OUT/<method>/report.json``.

``fsdp2``: ``torch.distributed.fsdp.fully_shard`` per decoder block and at the root (what accelerate's
FSDP2 plugin applies on GPUs; accelerate 1.x enables its FSDP plugin on GPU-class devices only). Each
rank trains on its half of every batch; rank 0 also trains an unsharded copy on the mean of the two
halves' losses, which FSDP's gradient averaging must reproduce.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from tests.integration.helpers import TokenDataset, peft_model, sequences  # noqa: E402

STEPS = 3


def flat_adapter(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


def run_ddp(out: Path, methods: list[str]) -> None:
    from transformers import Trainer, TrainingArguments

    from loramix.callbacks import RouterStatsCallback

    for method in methods:
        model = peft_model(method)
        start = flat_adapter(model)
        args = TrainingArguments(
            output_dir=str(out / method / "trainer"),
            max_steps=STEPS,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=TokenDataset(sequences(rows=8)),
            callbacks=[RouterStatsCallback()],
        )
        trainer.train()
        state = trainer.accelerator.state
        final = flat_adapter(model)
        gathered = [torch.zeros_like(final) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, final)
        # each rank saw other rows: the gradient all-reduce is what keeps them equal
        first_batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
        batches = [torch.zeros_like(first_batch) for _ in range(dist.get_world_size())]
        dist.all_gather(batches, first_batch.contiguous())
        if dist.get_rank() == 0:
            trainer.save_model(str(out / method / "adapter"))
            torch.save(
                {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                out / method / "final.pt",
            )
            report = {
                "distributed_type": str(state.distributed_type),
                "backend": dist.get_backend(),
                "world_size": dist.get_world_size(),
                "ddp": type(trainer.model_wrapped).__name__,
                "identical": all(torch.equal(g, gathered[0]) for g in gathered),
                "changed": not torch.equal(final, start),
                "ranks_saw_other_rows": not torch.equal(batches[0], batches[1]),
                "logs": [e for e in trainer.state.log_history if "loss" in e],
            }
            (out / method / "report.json").write_text(json.dumps(report))
        dist.barrier()


def run_fsdp2(out: Path, methods: list[str]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for method in methods:
        model = peft_model(method).train()
        reference = peft_model(method).train() if rank == 0 else None
        initial = (
            {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad} if rank == 0 else {}
        )
        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        sharded = sum(type(p).__name__ == "DTensor" for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        if reference is not None:
            ref_optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
        data = TokenDataset(sequences(rows=2 * world * STEPS))
        rows = [data[i] for i in range(len(data))]
        aux = []
        for step in range(STEPS):
            halves = [rows[(step * world + r) * 2 : (step * world + r) * 2 + 2] for r in range(world)]
            batches = [{k: torch.stack([row[k] for row in half]) for k in half[0]} for half in halves]
            outputs = model(**batches[rank])
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            aux.append(outputs.aux_loss.item())
            if reference is not None:
                loss = sum(reference(**b).loss for b in batches) / world
                loss.backward()
                ref_optimizer.step()
                ref_optimizer.zero_grad()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            trained = {n: full[n] for n, p in reference.named_parameters() if p.requires_grad}
            expected = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}
            max_diff = max((trained[n] - expected[n]).abs().max().item() for n in expected)
            # Save through PEFT from the gathered full state dict (adapter keys only).
            reference.save_pretrained(str(out / method / "adapter"), state_dict=full)
            torch.save(trained, out / method / "final.pt")
            report = {
                "world_size": world,
                "backend": dist.get_backend(),
                "sharded_adapter_params": sharded,
                "max_diff_vs_unsharded": max_diff,
                "changed": sum(not torch.equal(trained[n], initial[n]) for n in initial) > len(initial) // 2,
                "aux": aux,
            }
            (out / method).mkdir(parents=True, exist_ok=True)
            (out / method / "report.json").write_text(json.dumps(report))
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    mode, out, methods = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if mode == "ddp":
        from accelerate import PartialState

        PartialState(cpu=True)  # sets up the gloo process group from accelerate's launcher
        run_ddp(out, methods)
    elif mode == "fsdp2":
        run_fsdp2(out, methods)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if os.environ.get("RANK", "0") == "0":
        (out / "done").write_text("ok")


if __name__ == "__main__":
    main()
