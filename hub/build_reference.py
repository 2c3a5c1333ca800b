"""Build the tiny reference checkpoint of mmpeft (image + audio + text, ~3 MB), offline and deterministically.

    python hub/build_reference.py outputs/mmpeft-tiny-omni

The result loads with `MMPeftForConditionalGeneration.from_pretrained(dir)`, or with plain transformers and
`trust_remote_code=True`. It is the embedded default model of `recipes/finetune.py`.
"""

import argparse

from mmpeft.reference import build_reference_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    print(f"Reference checkpoint written to {build_reference_checkpoint(args.output_dir, seed=args.seed)}")


if __name__ == "__main__":
    main()
