"""Chat in the terminal with any output of recipes/finetune.py (full weights, a LoRA / QLoRA adapter on its base, a
merged export), the answer streamed as it is generated.

    python recipes/chat.py outputs/tiny-lora
    python recipes/chat.py outputs/tiny-lora-merged --temperature 0 --max_new_tokens 64   # greedy
    python recipes/chat.py outputs/tiny-full --temperature 0.9 --top_p 0.95 --seed 0

Commands at the `you> ` prompt: `/image PATH` and `/audio PATH` attach a file from this disk to the next message,
`/reset` starts a new conversation, `/exit` (or end of input, Ctrl-D) quits; any other line is a message. The
conversation is kept and sent whole each turn. Prompts are built by the training data path (the chat template, the
media placeholders and checks used in training and evaluation), so a greedy answer here (`--temperature 0`) is the
one evaluation generates for the same conversation. A file that is missing, unreadable or too long is refused in one
line and the chat goes on, the conversation unchanged.
"""

import argparse
import os
import sys
import threading
from collections.abc import Iterator

import torch
from transformers import TextIteratorStreamer

from mmpeft.inference import load_for_inference
from mmpeft.serving import Completion, Engine, RequestError, ServeSettings


class ChatError(ValueError):
    """A message or attachment refused (missing or bad file, conversation too long); one line."""


class ChatSession:
    """A multi-turn conversation with a model: attach media, send a message, stream the answer.

    `temperature` 0 generates greedily; above 0 it samples with `top_p`. `seed` seeds torch once, for a
    reproducible session.
    """

    def __init__(
        self, model, processor, temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 256, seed=None
    ):
        # Requests are built and generated as the server builds them; media are the user's own files: any local
        # path may be read (the whole disk is the media folder), nothing remote.
        settings = ServeSettings(media_dir="/", max_tokens_limit=max_new_tokens, max_audio_seconds=3600.0)
        self.engine, self.processor = Engine(model, processor, settings), processor
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        if seed is not None:
            torch.manual_seed(seed)
        self.history: list[dict] = []
        self.pending: list[dict] = []  # media parts for the next user message

    def reset(self):
        """Forget the conversation and any attachments not yet sent."""
        self.history, self.pending = [], []

    def attach_image(self, path: str):
        """Attach the image at `path` to the next message; `ChatError` if it is missing or cannot be read."""
        self._attach("image", path)

    def attach_audio(self, path: str):
        """Attach the audio file at `path` to the next message; `ChatError` if it is missing or cannot be read."""
        self._attach("audio", path)

    def _attach(self, kind: str, path: str):
        path = os.path.abspath(os.path.expanduser(path))
        part = {"type": kind, kind: path}
        self._inputs([{"role": "user", "content": [part]}], path)  # checked (and decoded) now, not at send
        self.pending.append(part)

    def _inputs(self, messages: list[dict], path: str | None = None) -> dict[str, torch.Tensor]:
        """Model inputs of the generation prompt after `messages`, built as the server (and evaluation) builds them."""
        try:
            return self.engine.inputs(self._completion(messages))
        except RequestError as error:
            message = str(error)
            raise ChatError(message if path is None or path in message else f"{path}: {message}") from error

    def _completion(self, messages: list[dict]) -> Completion:
        return Completion(messages, self.max_new_tokens, self.temperature, self.top_p, [], None, True)

    def send(self, text: str) -> Iterator[str]:
        """Send `text` (with the attached media) and return an iterator of the answer's pieces as they are
        generated. The inputs are built before it returns (`ChatError` then, the conversation unchanged); the turn
        joins the history once the answer is complete."""
        message = {"role": "user", "content": [*self.pending, {"type": "text", "text": text}]}
        inputs = self._inputs([*self.history, message])
        self.pending = []
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure = []

        def generate():
            try:
                self.engine.generate(self._completion([*self.history, message]), inputs, streamer)
            except BaseException as error:  # reported by the iterator, in the caller's thread
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        return self._stream(streamer, thread, failure, message)

    def _stream(self, streamer, thread, failure, message) -> Iterator[str]:
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if failure:
            raise failure[0]
        self.history += [message, {"role": "assistant", "content": "".join(pieces)}]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="Output folder of recipes/finetune.py or recipes/merge.py.")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 generates greedily (default 0.7).")
    parser.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling when sampling (default 0.9).")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="Longest answer (default 256).")
    parser.add_argument("--seed", type=int, default=None, help="Seed for a reproducible session.")
    parser.add_argument("--device", default=None, help="Where to run, e.g. cuda (default: cuda if available).")
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error("--temperature must be >= 0, --top_p in (0, 1], --max_new_tokens >= 1")
    return args


def main(argv=None, stdin=None, stdout=None) -> int:
    """The chat loop on `stdin` / `stdout` (the terminal by default); returns the exit status."""
    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, processor = load_for_inference(args.model, device=device)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = ChatSession(model, processor, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    print("Commands: /image PATH, /audio PATH, /reset, /exit (or Ctrl-D).", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            print(file=stdout)
            return 0
        line = line.strip()
        command, _, rest = line.partition(" ")
        try:
            if command == "/exit":
                return 0
            if command == "/reset":
                session.reset()
                print("(new conversation)", file=stdout)
            elif command in ("/image", "/audio"):
                if not rest.strip():
                    raise ChatError(f"usage: {command} PATH")
                getattr(session, f"attach_{command[1:]}")(rest.strip())
                print(f"(attached {rest.strip()})", file=stdout)
            elif line.startswith("/"):
                raise ChatError(f"unknown command {command} (/image PATH, /audio PATH, /reset, /exit)")
            elif line:
                pieces = session.send(line)
                print("assistant> ", end="", file=stdout, flush=True)
                for piece in pieces:
                    print(piece, end="", file=stdout, flush=True)
                print(file=stdout, flush=True)
        except ChatError as error:
            print("error:", " ".join(str(error).split()), file=stdout, flush=True)


if __name__ == "__main__":
    sys.exit(main())
