"""Merge a LoRA / QLoRA output of recipes/finetune.py into a plain 16-bit checkpoint.

    python recipes/merge.py outputs/tiny-lora outputs/tiny-lora-merged [--dtype bfloat16]

The base named in the adapter's config is loaded unquantized, the adapter merged in, and model + processor
saved: the result loads with `MMPeftForConditionalGeneration.from_pretrained` (or plain transformers with
`trust_remote_code=True`) and needs no PEFT.
"""

import argparse

import torch

from mmpeft.inference import merge_adapter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="output_dir of a lora / qlora run")
    parser.add_argument("output_dir", help="where the merged checkpoint goes")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    print(
        f"Merged checkpoint written to {merge_adapter(args.adapter_dir, args.output_dir, getattr(torch, args.dtype))}"
    )


if __name__ == "__main__":
    main()
