"""Benchmark of recipes/serve.py's API: time to first token and tokens/s of streamed answers, one request at a time
and several at once, over real HTTP on loopback.

    python recipes/benchmarks/benchmark_serve.py                       # the tiny reference model, 8 requests
    python recipes/benchmarks/benchmark_serve.py outputs/tiny-lora --requests 32 --concurrency 4 --max_tokens 64

Each request sends an image (a data: URI), a WAV clip and a question, with `stream: true` and `temperature: 0`,
and is measured on the client side: time to the first content chunk, and completion tokens (the server's usage
count is not streamed: the tokens of the answer text) per second of generation. Generations are queued by the
server, so with concurrency above 1 the time to first token includes waiting.
"""

import argparse
import base64
import io
import json
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import soundfile
import uvicorn
from PIL import Image

from mmpeft.inference import load_for_inference
from mmpeft.serving import ServeSettings, create_app
from mmpeft.training import reference_checkpoint


def request_body(max_tokens: int) -> dict:
    image, audio = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image, "PNG")
    t = np.arange(16000) / 16000
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    image_data, audio_data = (base64.b64encode(f.getvalue()).decode() for f in (image, audio))
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_data}"}},
        {"type": "input_audio", "input_audio": {"data": audio_data, "format": "wav"}},
        {"type": "text", "text": "What colour is the square, and what do you hear?"},
    ]  # fmt: skip
    return {"messages": [{"role": "user", "content": content}], "stream": True, "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip


def timed_request(url: str, body: dict, tokenizer) -> dict:
    start = time.perf_counter()
    first, text = None, ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text += delta
    end = time.perf_counter()
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {
        "ttft_s": (first or end) - start,
        "tokens": tokens,
        "tokens_per_s": tokens / max(end - (first or end), 1e-9),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="an output folder (default: the tiny reference model)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max_tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model, processor = load_for_inference(args.model or reference_checkpoint())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(model, processor, ServeSettings()), port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url, body = f"http://127.0.0.1:{port}", request_body(args.max_tokens)
    timed_request(url, body, processor.tokenizer)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        runs = list(pool.map(lambda _: timed_request(url, body, processor.tokenizer), range(args.requests)))
    wall = time.perf_counter() - start
    server.should_exit = True
    summary = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "median_ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "total_tokens_per_s": sum(r["tokens"] for r in runs) / wall,
        "requests_per_s": args.requests / wall,
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
