"""recipes/stress.py at its smallest: every hostile case through the real recipe, each counted for its reason."""

import os
import sys

from recipe_helpers import REPO


sys.path.insert(0, os.path.join(REPO, "recipes"))
import stress  # noqa: E402


def test_every_sample_is_trained_on_or_skipped_for_its_reason(tmp_path):
    result = stress.main(["--output_dir", str(tmp_path), "--num_good", "6", "--long_audio_rate", "1000"])
    assert result["problems"] == []
    data, media = tmp_path / "data", tmp_path / "data" / "media" / "hostile"
    field = "messages[0].content[0]: "
    kept_cases = [case for case, outcome in stress.CASES.items() if outcome == stress.KEPT]
    assert len(kept_cases) == 11
    assert result["read"] == 6 + len(stress.CASES) == 40
    assert result["trained on"] == 6 + 11 and result["skipped"] == 23
    assert result["trainer"].state.global_step == 3  # one epoch of 17 samples, 8 per step
    # Exact reasons; those that quote Pillow or libsndfile (whose wording is theirs) by their own prefix.
    quoting = (f"{field}cannot decode audio: ", f"{field}image is over the limit of 67108864 pixels, refused before ")
    by_reason = {reason: count for reason, count in result["by reason"].items() if not reason.startswith(quoting)}
    assert sorted(count for reason, count in result["by reason"].items() if reason.startswith(quoting)) == [1, 1]
    assert any(reason.startswith(quoting[0]) for reason in result["by reason"])  # the truncated FLAC
    assert by_reason == {
        f"{field}cannot decode image: the file is truncated": 2,  # PNG and JPEG
        f"{field}file is empty (0 bytes): {media / 'empty.png'}": 1,
        f"{field}file is empty (0 bytes): {media / 'empty.wav'}": 1,
        f"{field}not a file: {media / 'folder.png'}": 1,
        f"{field}not a file: {media / 'folder.wav'}": 1,
        f"{field}media path '../../etc/passwd' is outside the data folder {data} "
        "(set allow_media_outside_data_dir to allow)": 1,
        f"{field}media path '/etc/passwd' is outside the data folder {data} "
        "(set allow_media_outside_data_dir to allow)": 1,
        f"{field}audio contains NaN or infinite samples": 2,
        f"{field}audio is empty (0 samples)": 1,
        "longer than max_length": 1,  # the 2-hour clip, measured from its header
        "invalid UTF-8 at byte 47 of the line": 1,
        "malformed JSON line: Expecting ',' delimiter at the end of the line": 1,
        "malformed JSON line: nested too deeply to parse": 1,
        f"{field}'bytes' must hold the encoded file, got str '/etc/passwd' (give a file as 'path')": 1,
        f"{field}media URL http://169.254.169.254/latest/meta-data/ refused: remote media are off "
        "(set allow_remote_media)": 1,
        f"{field}unsupported URL scheme in file:///etc/passwd (http and https only)": 1,
        f"{field}media path 'media/hostile/link.png' is outside the data folder {data} "
        "(set allow_media_outside_data_dir to allow)": 1,
        "40 images of 2684354560 pixels in all are over the sample budget of 134217728 pixels "
        "(max_image_pixels_per_sample)": 1,
        "messages[0]: unknown or missing role {'role': ['user'], 'content': 'hi'}": 1,
    }
    # The odd but valid samples are among those trained on, each exactly once.
    trained = list(result["trainer"].train_dataset.rows["where"])
    assert sorted(result["cases"][where] for where in trained if result["cases"][where] != "good") == sorted(
        kept_cases
    )


def test_accounting_catches_a_lost_or_misfiled_sample():
    cases = {"d:1": "good", "d:2": "NaN audio", "d:3": "1x1 image"}
    reason = "messages[0].content[0]: audio contains NaN or infinite samples"
    report = {"read": 3, "skipped": 1, "reasons": {reason: 1}, "where": {reason: ["d:2"]}}
    assert stress.account(cases, report, ["d:1", "d:3"])[1] == []
    # A sample neither trained on nor reported; a good sample skipped; a skip for the wrong reason.
    assert stress.account(cases, report, ["d:1"])[1] == [
        "read 3 != trained on 1 + skipped 1",
        "trained on the wrong samples: missing ['d:3'], unexpected []",
    ]
    misfiled = {**report, "where": {reason: ["d:1"]}}
    assert stress.account(cases, misfiled, ["d:2", "d:3"])[1] == [
        "trained on the wrong samples: missing ['d:1'], unexpected ['d:2']",
        f"d:1 (good) skipped for {reason!r}",
    ]
    other = {**report, "reasons": {"no assistant turn to learn from": 1}, "where": {}}
    assert stress.account(cases, other, ["d:1", "d:3"])[1] == [
        "unexpected skip reason: 1 x 'no assistant turn to learn from'",
        f"0 samples skipped for {stress.CASES['NaN audio']!r}, expected 1",
    ]
