"""recipes/chat.py as a real process on the tiny default trained a few steps: greedy answers over a multi-turn
conversation with an image equal `model.generate` on the processor's own inputs; a missing file is one error line and
the chat goes on."""

import os
import re
import subprocess
import sys

import torch
from PIL import Image
from recipe_helpers import REPO, TINY, finetune

from mmpeft.inference import load_for_inference


MAX_NEW_TOKENS = 6


def expected_answers(model, processor, questions: list[str], image) -> list[str]:
    """Greedy answers to `questions` in one conversation, the image with the first, via the processor directly."""
    messages, answers = [], []
    for turn, question in enumerate(questions):
        content = [{"type": "image"}] if turn == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
        answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(answer)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answers


def test_chat_streams_greedy_answers_over_turns(tmp_path):
    out = tmp_path / "out"
    finetune.main([*TINY, "--output_dir", str(out), "--report_to", "none"])
    image_path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image_path)
    missing = tmp_path / "missing.wav"
    questions = ["What colour is the shape?", "Is the shape a circle?"]
    lines = [f"/image {image_path}", *questions, "/reset", f"/audio {missing}", "/exit"]

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "chat.py"), str(out), "--temperature", "0"]
        + ["--max_new_tokens", str(MAX_NEW_TOKENS)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    answers = re.findall(r"assistant> (.*?)\nyou> ", result.stdout, re.S)

    model, processor = load_for_inference(out)
    image = Image.open(image_path).convert("RGB")
    assert len(answers) == len(questions), result.stdout
    assert answers == expected_answers(model, processor, questions, image)
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and str(missing) in errors[0], result.stdout
    assert result.stdout.count("you> ") == len(lines)  # a prompt per line: the chat went on after the error
