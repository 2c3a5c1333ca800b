"""Serve a trained mmpeft model with an OpenAI-compatible API: chat completions with images and audio.

    python recipes/serve.py outputs/tiny-lora                       # http://127.0.0.1:8000/v1
    python recipes/serve.py outputs/tiny-lora --port 8001 --api-key secret --max_audio_seconds 60

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "What colour is the square?"}], "temperature": 0}'

Any output of recipes/finetune.py or recipes/merge.py works (full weights, a LoRA / QLoRA adapter with its base,
a merged export). The server binds 127.0.0.1 unless told otherwise; with `--api-key` requests must send
`Authorization: Bearer <key>` (the `openai` client's `api_key`). Images come as `data:` URIs, paths only inside
`--media_dir`, URLs only with `--allow_remote_media`; audio as base64 `input_audio`. See mmpeft/serving.py.
"""

import argparse
import os

import uvicorn

from mmpeft.data import MediaPolicy
from mmpeft.inference import load_for_inference
from mmpeft.serving import ServeSettings, create_app


def main(argv=None):
    defaults = ServeSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("model", help="an output folder of recipes/finetune.py or recipes/merge.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("MMPEFT_API_KEY"), help="or MMPEFT_API_KEY")
    parser.add_argument("--model_name", default=None, help="the model's id in the API (default: the folder's name)")
    parser.add_argument("--media_dir", default=None, help="image paths are allowed, inside this folder only")
    parser.add_argument("--allow_remote_media", action="store_true", help="fetch http(s) image URLs")
    parser.add_argument("--max_media_items", type=int, default=defaults.max_media_items)
    parser.add_argument("--max_audio_seconds", type=float, default=defaults.max_audio_seconds)
    parser.add_argument("--max_request_bytes", type=int, default=defaults.max_request_bytes)
    parser.add_argument("--max_tokens_limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--max_image_pixels_per_sample", type=int, default=MediaPolicy().max_sample_pixels)
    args = parser.parse_args(argv)

    model, processor = load_for_inference(args.model)
    settings = ServeSettings(
        model_name=args.model_name or os.path.basename(os.path.normpath(args.model)),
        api_key=args.api_key,
        media_dir=args.media_dir and os.path.abspath(args.media_dir),
        allow_remote_media=args.allow_remote_media,
        max_media_items=args.max_media_items,
        max_audio_seconds=args.max_audio_seconds,
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        media_policy=MediaPolicy(max_sample_pixels=args.max_image_pixels_per_sample),
    )
    print(f"mmpeft: serving {args.model} as {settings.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(create_app(model, processor, settings), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
