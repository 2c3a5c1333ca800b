"""Where media may come from (`mmpeft.data.sources`): containment of local paths (Hub datasets included), links
swapped in after preparation, per-sample budgets, media that break during training, and remote media -- off by
default, and when on fetched once from a real HTTP server on loopback, under timeouts, a byte cap, the image
limits and the address rules."""

import io
import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile
from PIL import Image
from tiny_parts import build, png_header_only

from mmpeft.data import BadSampleError, MediaPolicy, MMPeftDataset, Record, prepare_examples, read_records
from mmpeft.data.dataset import make_row
from mmpeft.data.preparation import prepare_source
from mmpeft.data.sources import MAX_REDIRECTS
from mmpeft.data.streaming import StreamingDataset


@pytest.fixture(scope="module")
def processor():
    return build("llama", "siglip", "whisper", audio_frames_per_token=2)[1]


def png(size=(16, 12), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def wav(seconds: float) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(16000 * seconds), np.float32), 16000, format="WAV")
    return buffer.getvalue()


def sample(*parts, answer="ok"):
    content = [{"type": "text", "text": part} if isinstance(part, str) else part for part in parts]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def image(source):
    return {"type": "image", "image": source}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """`data/` with media, and `outside/` beside it holding a valid image that the data must not reach."""
    (tmp_path / "data" / "media").mkdir(parents=True)
    (tmp_path / "data" / "media" / "red.png").write_bytes(png())
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(png(color=(0, 0, 255)))
    return tmp_path


@pytest.mark.parametrize("path", ["/etc/passwd", "media/red.png", "../secret.png"])
def test_hub_dataset_records_may_not_read_local_paths(path, processor):
    # A Hub dataset has no data folder (base_dir None): any local path in it is outside, relative ones included.
    record = Record(sample(image(path)), "user/data[train][3]", None)
    with pytest.raises(BadSampleError) as raised:
        make_row(record, processor, None)
    assert raised.value.where == "user/data[train][3]" and raised.value.field == "messages[0].content[0]"
    assert raised.value.reason == (
        f"local media path {path!r} in a dataset without a data folder (a Hub dataset) is refused "
        "(set allow_media_outside_data_dir to allow)"
    )
    # Inline bytes, as Hub datasets carry their media, are fine.
    make_row(Record(sample(image({"bytes": png(), "path": path})), "user/data[train][3]", None), processor, None)


def test_a_link_out_of_the_data_folder_is_refused(data, processor):
    os.symlink(data / "outside" / "secret.png", data / "data" / "media" / "link.png")
    path = write_jsonl(data / "data" / "d.jsonl", [sample(image("media/link.png"))])
    with pytest.raises(BadSampleError, match=r"media path 'media/link.png' is outside the data folder"):
        prepare_examples(read_records(path), processor)


@pytest.mark.parametrize("swapped", ["file", "folder"])
def test_a_file_swapped_for_a_link_after_preparation_is_refused_at_load(swapped, data, processor):
    path = write_jsonl(data / "data" / "d.jsonl", [sample(image("media/red.png")), sample("text only")])
    rows, _ = prepare_examples(read_records(path), processor)
    assert MMPeftDataset(rows, processor)[0]["pixel_values"].shape[0] == 1
    if swapped == "file":  # the file becomes a link to one outside
        os.remove(data / "data" / "media" / "red.png")
        os.symlink(data / "outside" / "secret.png", data / "data" / "media" / "red.png")
    else:  # the folder becomes a link to one outside holding a file of the same name
        shutil.move(data / "data" / "media", data / "moved")
        shutil.copy(data / "outside" / "secret.png", data / "outside" / "red.png")
        os.symlink(data / "outside", data / "data" / "media")
    with pytest.raises(BadSampleError) as raised:
        MMPeftDataset(rows, processor, on_bad_sample="error")[0]
    assert raised.value.where == f"{path}:1" and raised.value.field == "messages[0].content[0]"
    assert "is now a symbolic link to" in raised.value.reason and str(data / "outside") in raised.value.reason
    item = MMPeftDataset(rows, processor, on_bad_sample="skip")[0]  # skipped: the next sample stands in
    assert [s["where"] for s in item["skipped_samples"]] == [f"{path}:1"] and "pixel_values" not in item


def test_streamed_data_is_held_to_the_same_rules(data, processor):
    path = write_jsonl(
        data / "data" / "d.jsonl",
        [
            sample(image({"bytes": "/etc/passwd"})),
            sample(image("http://169.254.169.254/latest/meta-data/")),
            sample(image("../outside/secret.png")),
            sample(image("media/red.png")),
        ],
    )
    [item] = list(StreamingDataset([(path, "train")], processor, on_bad_sample="skip"))
    assert item["pixel_values"].shape[0] == 1
    assert [(s["where"], s["reason"].split(": ", 1)[1].split(" ")[0]) for s in item["skipped_samples"]] == [
        (f"{path}:1", "'bytes'"),
        (f"{path}:2", "media"),
        (f"{path}:3", "media"),
    ]
    assert "remote media are off" in item["skipped_samples"][1]["reason"]
    assert "is outside the data folder" in item["skipped_samples"][2]["reason"]


def test_a_cached_preparation_is_not_reused_under_another_media_policy(data, processor, tmp_path):
    path = write_jsonl(data / "data" / "d.jsonl", [sample(image("../outside/secret.png")), sample("text")])
    strict = prepare_source(path, processor, str(tmp_path / "cache"), on_bad_sample="skip")
    assert strict.report.skipped == 1
    relaxed = prepare_source(path, processor, str(tmp_path / "cache"), media_policy=MediaPolicy(allow_outside=True))
    assert not relaxed.reused and relaxed.report.kept == 2
    assert prepare_source(path, processor, str(tmp_path / "cache"), on_bad_sample="skip").reused


def test_a_media_file_removed_during_training_is_skipped_and_named(data, processor):
    path = write_jsonl(data / "data" / "d.jsonl", [sample(image("media/red.png")), sample("text only")])
    rows, _ = prepare_examples(read_records(path), processor)
    os.remove(data / "data" / "media" / "red.png")
    item = MMPeftDataset(rows, processor, on_bad_sample="skip")[0]
    [skipped] = item["skipped_samples"]
    assert skipped["where"] == f"{path}:1"
    assert skipped["reason"] == f"messages[0].content[0]: file not found: {data / 'data' / 'media' / 'red.png'}"
    with pytest.raises(BadSampleError, match="file not found"):
        MMPeftDataset(rows, processor, on_bad_sample="error")[0]


def test_the_sample_budget_is_checked_again_before_decoding_at_load(data, processor):
    # 3 images of 8192 x 8192 (headers only: decoding would fail as truncated) pass preparation unread with
    # validate_media none, and are refused from their headers when loaded, before any pixel is decoded.
    (data / "data" / "media" / "max.png").write_bytes(png_header_only(8192, 8192))
    path = write_jsonl(data / "data" / "d.jsonl", [sample(*[image("media/max.png")] * 3)])
    rows, report = prepare_examples(read_records(path), processor, validate_media="none")
    assert report.kept == 1
    with pytest.raises(BadSampleError) as raised:
        MMPeftDataset(rows, processor)[0]
    assert raised.value.reason == (
        "3 images of 201326592 pixels in all are over the sample budget of 134217728 pixels "
        "(max_image_pixels_per_sample)"
    )


def test_audio_budget_per_sample(data, processor):
    (data / "data" / "media" / "one.wav").write_bytes(wav(1.0))
    clip = {"type": "audio", "audio": "media/one.wav"}
    path = write_jsonl(data / "data" / "d.jsonl", [sample(clip), sample(clip, clip, clip)])
    policy = MediaPolicy(max_sample_audio_seconds=2.5)
    rows, report = prepare_examples(read_records(path, policy=policy), processor, on_bad_sample="skip")
    assert rows["where"] == [f"{path}:1"]
    assert report.where == {
        "3 audio clips of 3.0 s in all are over the sample budget of 2.5 s (max_audio_seconds_per_sample)": [
            f"{path}:2"
        ]
    }


def test_a_conversation_may_open_with_the_assistant(data, processor):
    opening = {"messages": [{"role": "assistant", "content": "Hello!"}, *sample("hi", answer="ok")["messages"]]}
    path = write_jsonl(data / "data" / "d.jsonl", [opening, {"messages": [{"role": "assistant", "content": "Hi"}]}])
    rows, report = prepare_examples(read_records(path), processor)
    assert report.kept == 2
    example = MMPeftDataset(rows, processor).example(0)
    labelled = processor.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label >= 0])
    assert "Hello!" in labelled and "ok" in labelled and "hi" not in labelled


def test_a_chat_template_that_raises_fails_the_sample_not_the_run(data, processor, monkeypatch):
    # Many templates refuse what they do not support with raise_exception (here: a system turn).
    template = processor.chat_template
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    monkeypatch.setattr(processor, "chat_template", refusing + template)
    system = {"messages": [{"role": "system", "content": "be brief"}, *sample("hi")["messages"]]}
    path = write_jsonl(data / "data" / "d.jsonl", [system, sample("hi")])
    rows, report = prepare_examples(read_records(path), processor, on_bad_sample="skip")
    assert rows["where"] == [f"{path}:2"]
    assert report.where == {
        "messages: the chat template cannot render it (TemplateError: System role not supported)": [f"{path}:1"]
    }


################
# Remote media
################
class MediaServer(BaseHTTPRequestHandler):
    """Serves what a remote media source may do: an image, audio, an image over the pixel limit, a body over the
    byte cap, no answer at all, and redirects (to a forbidden address, in a loop)."""

    hits: dict = {}

    def do_GET(self):
        MediaServer.hits[self.path] = MediaServer.hits.get(self.path, 0) + 1
        bodies = {"/red.png": png(), "/tone.wav": wav(0.5), "/large.png": png_header_only(9000, 9000)}
        if self.path in bodies:
            self._send(200, bodies[self.path])
        elif self.path == "/huge.bin":
            self._send(200, b"\0" * (2 << 20))
        elif self.path == "/hang":
            time.sleep(3)
            self._send(200, png())
        elif self.path == "/to-metadata":
            self._send(302, b"", location="http://169.254.169.254/latest/meta-data/")
        elif self.path == "/loop":
            self._send(302, b"", location="/loop")
        else:
            self._send(404, b"not found")

    def _send(self, status, body, location=None):
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (the byte cap, a timeout)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), MediaServer)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


LOOPBACK = MediaPolicy(
    allow_remote=True, allowed_networks=("127.0.0.1/32",), remote_timeout=1.0, remote_max_bytes=1 << 20
)


def test_remote_media_are_fetched_once_at_preparation_and_never_in_training(data, processor, server, tmp_path):
    MediaServer.hits.clear()
    url, audio_url = f"{server}/red.png", f"{server}/tone.wav"
    path = write_jsonl(
        data / "data" / "d.jsonl", [sample(image(url), {"type": "audio", "path": audio_url}), sample("text")]
    )
    prepared = prepare_source(path, processor, str(tmp_path / "cache"), media_policy=LOOPBACK)
    assert prepared.report.kept == 2 and MediaServer.hits == {"/red.png": 1, "/tone.wav": 1}
    reference = prepared.rows[0]["images"][0]
    assert reference["bytes"] == png() and reference["path"] == url  # kept with the prepared data
    item = MMPeftDataset(prepared.rows, processor)[0]
    assert item["pixel_values"].shape[0] == 1 and "input_features" in item
    again = prepare_source(path, processor, str(tmp_path / "cache"), media_policy=LOOPBACK)
    assert again.reused and MediaServer.hits == {"/red.png": 1, "/tone.wav": 1}


@pytest.mark.parametrize(
    "route, policy, reason",
    [
        ("/red.png", MediaPolicy(allow_remote=True), r"media host 127\.0\.0\.1 resolves to 127\.0\.0\.1, a loopback, "
         r"private, link-local or reserved address: refused \(list its network in remote_media_allowed_networks to "
         r"allow\)"),
        ("/to-metadata", LOOPBACK, r"media host 169\.254\.169\.254 resolves to 169\.254\.169\.254, a loopback, .*"),
        ("/loop", LOOPBACK, rf"cannot fetch .*/loop: more than {MAX_REDIRECTS} redirects"),
        ("/hang", LOOPBACK, r"cannot fetch .*/hang: timed out"),
        ("/huge.bin", LOOPBACK, r"cannot fetch .*/huge\.bin: 2097152 bytes, over the limit of 1048576 "
         r"\(remote_media_max_bytes\)"),
        ("/large.png", LOOPBACK, r"image of 9000x9000 pixels \(81000000\) is over the limit of 67108864 pixels, .*"),
        ("/missing.png", LOOPBACK, r"cannot fetch .*/missing\.png: HTTP 404 Not Found"),
    ],
)  # fmt: skip
def test_remote_media_rules(route, policy, reason, data, processor, server):
    path = write_jsonl(data / "data" / "d.jsonl", [sample(image(f"{server}{route}")), sample("text")])
    rows, report = prepare_examples(read_records(path, policy=policy), processor, on_bad_sample="skip")
    assert rows["where"] == [f"{path}:2"]
    [(key, where)] = report.where.items()
    assert where == [f"{path}:1"]
    field, _, message = key.partition(": ")
    assert field == "messages[0].content[0]"
    assert __import__("re").fullmatch(reason, message), message
