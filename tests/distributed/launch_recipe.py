"""Runs recipes/finetune.py in each launched process, then writes what that process holds after training:
its full trainable weights (gathered first under ZeRO-3) to `<output_dir>/rank<N>.safetensors`."""

import contextlib
import importlib.util
import os
import sys

import torch
from safetensors.torch import save_file


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("finetune", os.path.join(REPO, "recipes", "finetune.py"))
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)


def main():
    trainer = finetune.main(sys.argv[1:])
    params = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    gather = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
    with gather:  # collective: every rank enters
        weights = {name: p.detach().clone().contiguous() for name, p in params.items()}
    path = os.path.join(trainer.args.output_dir, f"rank{trainer.args.process_index}.safetensors")
    save_file(weights, path)
    rank, world = trainer.args.process_index, torch.distributed.get_world_size()
    print(f"launch_recipe: rank {rank} wrote {len(weights)} tensors, {world} ranks")


if __name__ == "__main__":
    main()
