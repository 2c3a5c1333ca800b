"""recipes/serve.py as users run it: a real server process on loopback serving a tiny trained LoRA model, called
with the official `openai` client and with raw HTTP. Answers equal `model.generate` on the processor's own
inputs; every hostile request gets a 4xx in OpenAI's error shape and the server keeps answering."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from recipe_helpers import REPO, TINY, finetune
from tiny_parts import png_header_only

from mmpeft.inference import load_for_inference


KEY = "test-key"
QUESTION = "What colour is the shape?"


def png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(buffer, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def image_part(data: bytes, kind="png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"}}


def audio_part(data: bytes, fmt="wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("lora")
    finetune.main([*TINY, "--output_dir", str(output), "--report_to", "none"])
    return output


@pytest.fixture(scope="module")
def server(trained):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, os.path.join(REPO, "recipes", "serve.py"), str(trained), "--port", str(port),
        "--api-key", KEY, "--model_name", "tiny", "--max_audio_seconds", "2", "--max_request_bytes", str(4 << 20),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()[-3000:]}")
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the server did not start within 180 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(trained):
    """Greedy answers of the trained model through the processor's own inputs (not the server's code path)."""
    model, processor = load_for_inference(trained)

    def answer(content: list[dict], images=(), audio=(), max_new_tokens=8) -> tuple[str, int]:
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[text], images=list(images) or None, audio=list(audio) or None, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        prompt = inputs["input_ids"].shape[1]
        return processor.tokenizer.decode(output[0, prompt:], skip_special_tokens=True), prompt

    return answer


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def ask(client, content, **options):
    options = {"temperature": 0, "max_tokens": 8, **options}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **options)


def test_openai_client_with_image_and_audio_gets_the_greedy_answer(client, reference):
    from mmpeft.data import load_audio, load_image

    image, clip = png(), wav(0.8)
    response = ask(client, [image_part(image), audio_part(clip), {"type": "text", "text": QUESTION}])
    expected, prompt = reference(
        [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": QUESTION}],
        images=[load_image(image)],
        audio=[load_audio(clip, 16000)],
    )
    assert response.choices[0].message.content == expected and response.model == "tiny"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8 and response.usage.prompt_tokens == prompt  # media tokens count
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streamed_answer_equals_the_whole_one(client):
    content = [image_part(png(color=(20, 200, 30))), {"type": "text", "text": QUESTION}]
    whole = ask(client, content).choices[0].message.content
    chunks = list(ask(client, content, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[0].choices[0].delta.role == "assistant"


def test_stop_strings_and_seeded_sampling(client):
    content = [{"type": "text", "text": QUESTION}]
    whole = ask(client, content, max_tokens=12).choices[0].message.content
    if len(whole) > 2:  # cut at the first occurrence of a piece of the answer, the piece left out
        stop = whole[1:3]
        cut = ask(client, content, max_tokens=12, stop=[stop]).choices[0]
        # Left out with what follows: the answer up to a stop string (tokens may end between characters).
        assert whole.startswith(cut.message.content) and stop not in cut.message.content
        assert len(cut.message.content) < len(whole) and cut.finish_reason == "stop"
    sampled = [
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": QUESTION}], temperature=1.5, seed=7, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_queued_not_mixed(client):
    colours = [(200, 30, 30), (20, 200, 30), (30, 30, 220), (240, 240, 20)]
    contents = [[image_part(png(color=c)), {"type": "text", "text": QUESTION}] for c in colours]
    alone = [ask(client, content).choices[0].message.content for content in contents]
    together = [None] * len(contents)

    def run(index):
        together[index] = ask(client, contents[index]).choices[0].message.content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(contents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def request(body=None, *, raw=None, key=KEY):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return {"content": raw if raw is not None else json.dumps(body).encode(), "headers": headers}


def user(*content):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(content)}], "max_tokens": 4}


TEXT = {"type": "text", "text": "hi"}
# case -> (request, status, param, words of the message)
HOSTILE = {
    "malformed JSON": (request(raw=b'{"messages": [}'), 400, None, "not valid JSON"),
    "JSON nested 100000 deep": (request(raw=b"[" * 100_000 + b"]" * 100_000), 400, None, "not valid JSON"),
    "not an object": (request([1, 2]), 400, None, "must be a JSON object"),
    "no messages": (request({"model": "tiny"}), 400, "messages", "non-empty list"),
    "unknown role": (request({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role", "role"),
    "unknown content type": (request(user({"type": "video_url", "video_url": "x"})), 400,
                             "messages[0].content[0].type", "unknown content part type 'video_url'"),
    "bad base64": (request(user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})), 400,
                   "messages[0].content[0]", "invalid base64"),
    "undecodable image": (request(user(image_part(b"not an image at all"))), 400, "messages[0].content[0]",
                          "cannot decode image"),
    "oversized image": (request(user(image_part(png_header_only(9000, 9000)))), 400, "messages[0].content[0]",
                        "over the limit of 67108864 pixels"),
    "audio over the duration limit": (request(user(audio_part(wav(3.0)))), 400, "messages",
                                      "over the sample budget of 2 s"),
    "unknown audio format": (request(user(audio_part(wav(0.5), fmt="aiff"))), 400,
                             "messages[0].content[0].format", "format must be one of"),
    "too many media items": (request(user(*[image_part(png())] * 9)), 400, "messages[0].content[8]",
                             "more than 8 images and audio clips"),
    "prompt over the context": (request(user({"type": "text", "text": "word " * 3000})), 400, "messages",
                                "exceed the model's context of 1024 tokens"),
    "image path": (request(user({"type": "image_url", "image_url": {"url": "/etc/passwd"}})), 400,
                   "messages[0].content[0]", "image paths are not allowed"),
    "image URL": (request(user({"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}})), 400,
                  "messages[0].content[0]", "image URLs are not allowed"),
    "max_tokens too large": (request({**user(TEXT), "max_tokens": 10**6}), 400, "max_tokens", "must be in"),
    "temperature as text": (request({**user(TEXT), "temperature": "hot"}), 400, "temperature", "must be a number"),
    "nothing to answer": (request({"messages": [{"role": "assistant", "content": "x"}]}), 400, "messages",
                          "must not be the assistant's"),
    "body over the size limit": (request(raw=b"{" + b" " * (5 << 20) + b"}"), 413, None, "over 4194304 bytes"),
    "missing API key": (request(user(TEXT), key=None), 401, None, "missing or wrong API key"),
    "wrong API key": (request(user(TEXT), key="guess"), 401, None, "missing or wrong API key"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_request_gets_a_4xx_and_the_server_keeps_serving(case, server, client):
    sent, status, param, words = HOSTILE[case]
    response = httpx.post(f"{server}/v1/chat/completions", timeout=60, **sent)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"].endswith("_error")
    assert ask(client, [TEXT]).choices[0].message.content is not None  # still serving


def browser():
    """Headless Chromium driven by Selenium, or a skip naming what is missing (`.ci/run` installs both)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_web_demo_in_a_real_browser_streams_the_greedy_answer(server, reference, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from mmpeft.data import load_audio, load_image

    image, clip = png(color=(30, 30, 220)), wav(0.8)
    (tmp_path / "square.png").write_bytes(image)
    (tmp_path / "tone.wav").write_bytes(clip)
    expected, _ = reference(
        [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": QUESTION}],
        images=[load_image(image)],
        audio=[load_audio(clip, 16000)],
    )
    driver = browser()
    try:
        driver.get(server)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        assert "vision: " in driver.find_element(By.ID, "composition").text
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "square.png"))
        driver.find_element(By.ID, "audio").send_keys(str(tmp_path / "tone.wav"))
        tokens = driver.find_element(By.ID, "max_tokens")
        tokens.clear()
        tokens.send_keys("8")
        driver.find_element(By.ID, "prompt").send_keys(QUESTION)
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 120).until(
            lambda d: (e := d.find_element(By.ID, "answer-0")).get_attribute("data-done") and e
        )
        driver.save_screenshot(str(tmp_path / "demo.png"))
        # textContent: the streamed text exactly as received (Selenium's .text trims and folds whitespace).
        assert answer.get_attribute("textContent") == expected
        assert "error" not in answer.get_attribute("class")
    finally:
        driver.quit()
    assert (tmp_path / "demo.png").stat().st_size > 0
