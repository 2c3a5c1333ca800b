"""One process of the FSDP2 test (`test_fsdp2.py`), started twice by `torchrun` on CPU over gloo.

Shards the tiny composition (SigLIP + Whisper encoder + Llama) with torch's `fully_shard`: every module whose class
`model._no_split_modules` names is its own unit, then the root. Trains a few AdamW steps in which the ranks' batches
hold different modalities (rank 0 an image and text in each step; rank 1 audio, then text only), gathers the full
state dict, and on rank 0 saves it with `save_pretrained` (and as a plain safetensors file, to compare the reloaded
model with). Writes `<output_dir>/rank<N>.json`: the losses, and how the model was sharded.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 fsdp2_train.py <output_dir>
"""

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tiny_parts
from tiny_parts import build, media  # noqa: E402


STEPS = 3


def batches(processor, rank: int) -> list[dict]:
    """This rank's batches, one per step, with labels: rank 0 image + text; rank 1 audio, text only, audio."""
    images, clips = media(seed=rank, num_images=1, audio_seconds=(0.5,))
    if rank == 0:
        kinds = [dict(text=["<image> what is in the picture? a cat"], images=images)] * STEPS
    else:
        audio = dict(text=["<audio> what is said? hello there"], audio=clips)
        kinds = [audio, dict(text=["no media at all in this sample"]), audio]
    out = []
    for kind in kinds:
        batch = dict(processor(**kind, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].clone()
        out.append(batch)
    return out


def main(output_dir: str):
    # A deadlock (a rank that skipped a tower's all-gather) ends in an error after this long, not in a hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model, processor = build("llama", "siglip", "whisper")  # seeded: the same weights on both ranks
    model.train()
    layer_classes = model._no_split_modules
    units = [name for name, module in model.named_modules() if type(module).__name__ in layer_classes]
    for name in units:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    losses = []
    for batch in batches(processor, rank):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    # Collective: every rank takes part; with cpu_offload only rank 0 receives the full tensors.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        # First: save_pretrained empties the dict it is given as it writes. Tied tensors share storage, which
        # safetensors refuses: one copy each.
        copies = {name: tensor.clone() for name, tensor in state.items()}
        save_file(copies, os.path.join(output_dir, "gathered.safetensors"))
        model.save_pretrained(os.path.join(output_dir, "model"), state_dict=state)
    dist.barrier()
    report = {
        "losses": losses,
        "layer_classes": sorted(layer_classes),
        "units": units,
        "fsdp_units": sum(isinstance(module, FSDPModule) for module in model.modules()),
        "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters()),
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(report, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
