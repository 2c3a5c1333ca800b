"""Serving a trained model: an OpenAI-compatible chat completions API (FastAPI), with images and audio.

    app = create_app(*load_for_inference("outputs/tiny-lora"), ServeSettings(model_name="tiny-lora"))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # or: python recipes/serve.py outputs/tiny-lora

Endpoints: `POST /v1/chat/completions` (OpenAI's request and response shapes, `stream: true` as server-sent
events of `chat.completion.chunk`s), `GET /v1/models`, `GET /health`, `GET /info` (the model's name and parts) and
`GET /`, a web demo page (`static/demo.html`: text, image and audio uploads, microphone recording, streamed
answers) that uses the same API.

A request becomes model inputs through the training data path (`mmpeft.data.dataset.make_row` and `load_item`
in generation mode): the same chat template, the same media checks (the pixel limit, the per-sample budget,
the media policy), the same placeholder rules (text typed as `<image>` stays text), so the server answers exactly
what evaluation generates for the same conversation. Content parts: `text`, `image_url` (a `data:` URI; an
`http(s)` URL only with `allow_remote_media`; a file path only inside `media_dir`) and `input_audio`
(`{"data": <base64>, "format": "wav" | "mp3" | "flac" | "ogg"}`). Media stay in memory: nothing a request sends
is written to disk.

Every bad request is answered 4xx with OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`)
and the server keeps serving. Generations run one at a time (a lock): concurrent requests queue, they are never
mixed into one generation.
"""

import base64
import binascii
import dataclasses
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TextIteratorStreamer

from .data import BadSampleError, MediaPolicy, Record
from .data.collator import MMPeftDataCollator
from .data.dataset import OverlongError, load_item, make_row


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
DEMO_PAGE = Path(__file__).parent / "static" / "demo.html"
ROLES = ("system", "user", "assistant")


@dataclass
class ServeSettings:
    """What the server accepts; the defaults are the safe ones."""

    model_name: str = "mmpeft"
    api_key: str | None = None  # requests must send `Authorization: Bearer <api_key>` when set
    media_dir: str | None = None  # image paths are read only inside this folder; None: no paths at all
    allow_remote_media: bool = False  # fetch http(s) image URLs (under `mmpeft.data.sources`' rules)
    max_media_items: int = 8  # images and audio clips in one request
    max_audio_seconds: float = 300.0  # audio in one request
    max_request_bytes: int = 32 * 2**20
    max_tokens_limit: int = 1024  # largest `max_tokens` a request may ask for
    default_max_tokens: int = 256
    media_policy: MediaPolicy = field(default_factory=MediaPolicy)  # its budgets and remote-media settings

    def policy(self) -> MediaPolicy:
        """The media policy requests are held to: the settings' own, with this server's remote-media switch and
        audio limit (local paths are never outside `media_dir`)."""
        return dataclasses.replace(
            self.media_policy,
            allow_outside=False,
            allow_remote=self.allow_remote_media,
            max_sample_audio_seconds=self.max_audio_seconds,
        )


class RequestError(ValueError):
    """A request that cannot be served: answered with `status` and OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 413: "invalid_request_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Completion:
    """What a request asks for, checked: the conversation (canonical messages) and the generation options."""

    messages: list[dict]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool


def _number(request: dict, name: str, default, low: float, high: float, kind=float):
    value = request.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r:.40}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low:g}, {high:g}], got {value}", name)
    return kind(value)


def _decode_base64(data, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise RequestError("expected base64 data as a non-empty string", param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"invalid base64 data: {error}", param) from error


def _image_source(part: dict, settings: ServeSettings, param: str):
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise RequestError("image_url needs a 'url' (a data: URI)", param)
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise RequestError("an image data URI must be data:image/<type>;base64,<data>", param)
        return {"bytes": _decode_base64(data, param)}
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_media:
            raise RequestError("image URLs are not allowed on this server: send the image as a data: URI", param)
        return url
    if settings.media_dir is None:
        raise RequestError("image paths are not allowed on this server: send the image as a data: URI", param)
    return url  # a path: resolved inside media_dir (and refused outside it) by the data path's resolver


def _audio_source(part: dict, param: str) -> dict:
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise RequestError("input_audio needs {'data': <base64>, 'format': 'wav' | 'mp3' | 'flac' | 'ogg'}", param)
    if audio.get("format") not in AUDIO_FORMATS:
        raise RequestError(f"input_audio format must be one of {', '.join(AUDIO_FORMATS)}", f"{param}.format")
    return {"bytes": _decode_base64(audio.get("data"), f"{param}.data")}


def parse_request(request, settings: ServeSettings) -> Completion:
    """The checked `Completion` of an OpenAI chat completions request body (parsed JSON); `RequestError` naming
    the first bad field otherwise."""
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    conversation, media = [], 0
    for turn, message in enumerate(messages):
        param = f"messages[{turn}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"each message needs a role of {', '.join(ROLES)}", f"{param}.role")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError("content must be a string or a list of content parts", f"{param}.content")
        parts = []
        for index, part in enumerate(content):
            part_param = f"{param}.content[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError("a text part needs a string 'text'", part_param)
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image_url", "input_audio"):
                raise RequestError(
                    f"unknown content part type {kind!r:.40} (text, image_url, input_audio)", f"{part_param}.type"
                )
            media += 1
            if media > settings.max_media_items:
                raise RequestError(f"more than {settings.max_media_items} images and audio clips", part_param)
            if kind == "image_url":
                parts.append({"type": "image", "image": _image_source(part, settings, part_param)})
            else:
                parts.append({"type": "audio", "audio": _audio_source(part, part_param)})
        conversation.append({"role": message["role"], "content": parts})
    if conversation[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer", "messages")
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = request.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError("seed must be a non-negative integer", "seed")
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    return Completion(
        messages=conversation,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", settings.default_max_tokens, 1,
                           settings.max_tokens_limit, int),
        temperature=_number(request, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(request, "top_p", 1.0, 0.0, 1.0),
        stop=stop,
        seed=seed,
        stream=stream,
    )  # fmt: skip


class Engine:
    """The model, its processor and the lock that makes generations run one at a time."""

    def __init__(self, model, processor, settings: ServeSettings):
        self.model, self.processor, self.settings = model.eval(), processor, settings
        self.policy = settings.policy()
        text_config = self.model.config.get_text_config()
        self.context_length = getattr(text_config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    def inputs(self, completion: Completion) -> dict[str, torch.Tensor]:
        """Model inputs of the conversation's generation prompt, through the training data path."""
        # The data path prepares a sample with its answer: a placeholder answer is added and left out again
        # (`prompt_only`), so the prompt is rendered and checked exactly as evaluation renders it.
        data = {"messages": completion.messages + [{"role": "assistant", "content": "."}]}
        record = Record(data, "request", self.settings.media_dir, self.policy)
        try:
            row = make_row(record, self.processor, None, validate_media="decode")
            item = load_item(row, self.processor, prompt_only=True, media_policy=self.policy)
        except OverlongError as error:
            raise RequestError(str(error.reason), "messages") from error
        except BadSampleError as error:
            param = f"messages{error.field[len('messages') :]}" if error.field else "messages"
            raise RequestError(error.reason, param) from error
        prompt = item["input_ids"].shape[0]
        if self.context_length is not None and prompt + completion.max_tokens > self.context_length:
            raise RequestError(
                f"the prompt ({prompt} tokens) and max_tokens ({completion.max_tokens}) exceed the model's context "
                f"of {self.context_length} tokens",
                "messages",
                code="context_length_exceeded",
            )
        batch = MMPeftDataCollator(self.processor.tokenizer.pad_token_id, padding_side="left")([item])
        return {name: tensor.to(self.model.device) for name, tensor in batch.items()}

    def _options(self, completion: Completion, inputs: dict) -> dict:
        sampling = completion.temperature > 0
        options = dict(inputs, max_new_tokens=completion.max_tokens, do_sample=sampling)
        if sampling:
            options.update(temperature=completion.temperature, top_p=completion.top_p)
        if completion.stop:
            options.update(stop_strings=completion.stop, tokenizer=self.processor.tokenizer)
        return options

    def generate(self, completion: Completion, inputs: dict, streamer=None) -> tuple[str, int, str]:
        """`(text, completion tokens, finish_reason)` of one generation (waits for the lock)."""
        with self.lock, torch.inference_mode():
            if completion.seed is not None:
                torch.manual_seed(completion.seed)
            output = self.model.generate(**self._options(completion, inputs), streamer=streamer)
        new = output[0, inputs["input_ids"].shape[1] :]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        text, stopped = _cut_at_stop(text, completion.stop)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        finished = stopped or len(new) < completion.max_tokens or int(new[-1]) in eos
        return text, len(new), "stop" if finished else "length"


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to its first stop string (OpenAI leaves the stop string out), and whether one was found."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def create_app(model, processor, settings: ServeSettings | None = None):
    """The FastAPI application serving `model` (any `load_for_inference` output) and its processor."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    settings = settings or ServeSettings()
    engine = Engine(model, processor, settings)
    app = FastAPI(title=f"mmpeft: {settings.model_name}")
    app.state.engine = engine

    def error(failure: RequestError) -> JSONResponse:
        return JSONResponse(failure.body(), status_code=failure.status)

    def check_key(request: Request):
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise RequestError(
                "missing or wrong API key (send Authorization: Bearer <key>)", status=401, code="invalid_api_key"
            )

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_request_bytes:
            raise RequestError(f"the request is over {settings.max_request_bytes} bytes", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > settings.max_request_bytes:
                raise RequestError(f"the request is over {settings.max_request_bytes} bytes", status=413)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as failure:
            raise RequestError(f"the request body is not valid JSON: {failure}") from None

    @app.get("/")
    def demo():  # the web demo: a page that talks to this server's API
        return HTMLResponse(DEMO_PAGE.read_text())

    @app.get("/info")
    def info():
        config = engine.model.config
        parts = {"vision": config.vision_config, "audio": config.audio_config, "language": config.text_config}
        composition = {part: sub.model_type for part, sub in parts.items() if sub is not None}
        return {"model": settings.model_name, "composition": composition}

    @app.get("/health")
    def health():
        return {"status": "ok", "model": settings.model_name}

    @app.get("/v1/models")
    def models(request: Request):
        try:
            check_key(request)
        except RequestError as failure:
            return error(failure)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "mmpeft"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_key(request)
            completion = parse_request(await read_json(request), settings)
            inputs = await _in_thread(engine.inputs, completion)  # decoding media: off the event loop
        except RequestError as failure:
            return error(failure)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": created, "model": settings.model_name}
        if completion.stream:
            return StreamingResponse(_stream(engine, completion, inputs, head), media_type="text/event-stream")
        text, tokens, finish = await _in_thread(engine.generate, completion, inputs)
        prompt = int(inputs["input_ids"].shape[1])
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens},
        }

    return app


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


def _stream(engine: Engine, completion: Completion, inputs: dict, head: dict):
    """Server-sent events of `chat.completion.chunk`s as tokens are generated, then `[DONE]`."""
    streamer = TextIteratorStreamer(engine.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}

    def run():
        try:
            result["value"] = engine.generate(completion, inputs, streamer)
        except Exception as failure:  # reported in the stream: the response has started, its status is sent
            result["error"] = failure
            streamer.end()

    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n"

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield event({"role": "assistant", "content": ""})
    sent, stopped = "", False
    for piece in streamer:
        if stopped:  # drain what is left: the generation ends on its own (stop strings end it too)
            continue
        text, stopped = _cut_at_stop(sent + piece, completion.stop)
        if text[len(sent) :]:
            yield event({"content": text[len(sent) :]})
            sent = text
    thread.join()
    if "error" in result:
        failure = RequestError(f"generation failed: {result['error']}", status=500)
        yield f"data: {json.dumps(failure.body())}\n\n"
    else:
        yield event({}, result["value"][2])
    yield "data: [DONE]\n\n"


__all__ = ["Completion", "Engine", "RequestError", "ServeSettings", "create_app", "parse_request"]
