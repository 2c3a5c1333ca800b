"""A chat template comes with the checkpoint and is a program: one that renders for hours is refused when the
processor is loaded, or, when only some samples make it loop, those samples are bad samples -- never a hang."""

import json
import signal
import threading
import time

import pytest
from tiny_parts import build

from mmpeft import MMPeftProcessor
from mmpeft.data.formats import BadSampleError
from mmpeft.data.preparation import prepare_source
from mmpeft.models import processing_mmpeft
from mmpeft.models.processing_mmpeft import DEFAULT_CHAT_TEMPLATE, ChatTemplateTimeout


# 10**10 iterations: each range is within the sandbox's limit (100,000), their product is not.
LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "Hello."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
]


@pytest.fixture
def limit(monkeypatch):
    """A short time limit, so that a looping template costs the test half a second."""
    monkeypatch.setattr(processing_mmpeft, "CHAT_TEMPLATE_TIME_LIMIT", 0.5)
    return 0.5


def test_a_chat_template_that_loops_is_refused_when_the_processor_loads(tmp_path, tok, limit):
    _, processor = build(tok=tok)
    processor.chat_template = LOOPS + DEFAULT_CHAT_TEMPLATE
    processor.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "chat_template.jinja").read_text().startswith(LOOPS)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"model/chat_template.jinja: rendering a two-message conversation took over"):
        MMPeftProcessor.from_pretrained(tmp_path / "model")
    assert time.monotonic() - start < 60  # generous: the template alone would render for about 20 minutes


def test_rendering_is_limited_and_leaves_no_timer_behind(tok, limit):
    _, processor = build(tok=tok)
    assert processor.apply_chat_template([CONVERSATION], tokenize=False)[0].startswith("<|im_start|>user")
    with pytest.raises(ChatTemplateTimeout, match=r"^chat template: rendering took over 0.5 s$"):
        processor.apply_chat_template([CONVERSATION], chat_template=LOOPS, tokenize=False)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


def test_outside_the_main_thread_rendering_is_unlimited(tok, limit):
    _, processor = build(tok=tok)
    results = []
    template = "{% for a in range(3) %}x{% endfor %}"  # signals reach only the main thread: no timer is set here
    thread = threading.Thread(
        target=lambda: results.append(processor.apply_chat_template([CONVERSATION], chat_template=template))
    )
    thread.start()
    thread.join()
    assert results == [["xxx"]]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_a_sample_that_makes_the_template_loop_is_a_bad_sample(tmp_path, tok, limit, num_workers):
    _, processor = build(tok=tok)
    # Loops only over a sample that asks for it: the processor loads, preparation meets it.
    slow = "{%- if 'slow' in messages[0]['content'][0]['text'] %}" + LOOPS + "{%- endif %}"
    processor.chat_template = slow + DEFAULT_CHAT_TEMPLATE
    data = tmp_path / "data.jsonl"
    samples = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Yes."}]}
        for text in ["fast one", "slow one", "fast two", "fast three"]
    ]
    data.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    settings = dict(max_length=None, on_overlong="skip", num_workers=num_workers)
    prepared = prepare_source(str(data), processor, str(tmp_path / "cache"), on_bad_sample="skip", **settings)
    assert prepared.report.kept == 3
    assert dict(prepared.report.reasons) == {"messages: chat template: rendering took over 0.5 s": 1}
    assert prepared.report.where["messages: chat template: rendering took over 0.5 s"] == [f"{data}:2"]
    with pytest.raises(BadSampleError, match=r"data.jsonl:2: field 'messages': chat template: rendering took over"):
        prepare_source(str(data), processor, str(tmp_path / "cache2"), on_bad_sample="error", **settings)
