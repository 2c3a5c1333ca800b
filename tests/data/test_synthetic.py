import hashlib
import json
import os

from mmpeft.data import generate_synthetic_dataset


def digest(folder):
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    return hashlib.sha256(b"".join(open(path, "rb").read() for path in files)).hexdigest()


def test_synthetic_dataset_is_deterministic_and_covers_every_family(tmp_path):
    first = generate_synthetic_dataset(str(tmp_path / "a"), num_train=80, num_eval=20)
    generate_synthetic_dataset(str(tmp_path / "b"), num_train=80, num_eval=20)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    rows = [json.loads(line) for line in open(first["train"])]
    assert len(rows) == 80 and {row["task"] for row in rows} == {"image", "audio", "image+audio", "text"}
    for row in rows:  # media files exist, and each family has the media it asks about
        media = [p for p in row["messages"][0]["content"] if p["type"] != "text"]
        assert [p["type"] for p in media] == {
            "image": ["image"],
            "audio": ["audio"],
            "image+audio": ["image", "audio"],
            "text": [],
        }[row["task"]]
        assert all(os.path.exists(os.path.join(tmp_path / "a", p["path"])) for p in media)
    # Held-out split: different samples.
    eval_rows = [json.loads(line) for line in open(first["eval"])]
    assert len(eval_rows) == 20 and not {
        p["path"] for r in eval_rows for p in r["messages"][0]["content"] if "path" in p
    } & {p["path"] for r in rows for p in r["messages"][0]["content"] if "path" in p}
