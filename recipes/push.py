"""Push an existing output of recipes/finetune.py to the Hub, with a model card.

    python recipes/push.py outputs/tiny-lora user/tiny-omni-lora              # adapter + processor + card
    python recipes/push.py outputs/tiny-lora user/tiny-omni --merge            # merged 16-bit weights
    python recipes/push.py outputs/tiny-full user/tiny-omni-full --private --comparison outputs/compare/comparison.md

The token comes from `--token`, `HF_TOKEN` or `huggingface-cli login`; it is never written anywhere.
"""

import argparse
import sys

from mmpeft.hub import PushError, push_output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="output_dir of a recipes/finetune.py run")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/my-omni-model")
    parser.add_argument("--merge", action="store_true", help="push LoRA / QLoRA merged into 16-bit weights")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--comparison", default=None, help="comparison.md of recipes/compare.py, for the card")
    args = parser.parse_args(argv)
    comparison = None
    if args.comparison:
        comparison = "\n".join(line for line in open(args.comparison) if line.startswith("|"))
    try:
        url = push_output(
            args.output_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            merge=args.merge,
            comparison=comparison,
        )
    except PushError as error:
        sys.exit(f"mmpeft: {error}")
    print(f"Pushed {args.output_dir} to {url}")


if __name__ == "__main__":
    main()
