"""recipes/eval.py on each kind of output of recipes/finetune.py (tiny default, a few steps): the same numbers
and answers as training-time evaluation, the reports, bad samples, W&B, and 2 processes giving 1 process's report."""

import base64
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from recipe_helpers import REPO, TINY, finetune

from mmpeft.inference import evaluate_generation, merge_adapter


_spec = importlib.util.spec_from_file_location("evaluate_recipe", os.path.join(REPO, "recipes", "eval.py"))
evaluate_recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_recipe)

RUNS = {  # settings under which the tiny default answers some eval samples right (full) or at least some text
    "lora": ["--learning_rate", "1e-2", "--max_steps", "24"],
    "full": ["--method", "full", "--learning_rate", "1e-3", "--max_steps", "24"],
    "qlora": ["--method", "qlora", "--learning_rate", "3e-3"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`{method: (output_dir, trainer, eval data path)}`, trained on first use."""
    runs = {}

    def train(method):
        if method not in runs:
            output = tmp_path_factory.mktemp(method)
            trainer = finetune.main([*TINY, *RUNS[method], "--report_to", "none", "--output_dir", str(output)])
            sources = json.loads((output / "data_report.json").read_text())
            [eval_data] = [path for path in sources if path.endswith("eval.jsonl")]
            runs[method] = (output, trainer, eval_data)
        return runs[method]

    return train


def evaluate(model_dir, data, output_dir, *args):
    return evaluate_recipe.main([str(model_dir), "--data", str(data), "--output_dir", str(output_dir), *args])


def eval_metrics(output_dir) -> dict:
    """What finetune.py reported for generation: `eval_accuracy*` without the prefix."""
    results = json.loads((output_dir / "eval_results.json").read_text())
    return {name.removeprefix("eval_"): value for name, value in results.items() if "accuracy" in name}


def predictions(report) -> list:
    return [sample["prediction"] for sample in report["samples"]]


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_numbers_equal_training_time_evaluation(method, trained, tmp_path):
    output, trainer, data = trained(method)
    report = evaluate(output, data, tmp_path / "eval")
    assert report["output_kind"] == ("full" if method == "full" else "adapter")
    assert report["metrics"] == eval_metrics(output)  # exactly, overall and per task
    # ... and answer by answer: the reloaded model generates what the trained one did.
    answers = evaluate_generation(trainer.model, trainer.processing_class, trainer.generation_dataset).answers
    assert predictions(report) == answers
    assert report["num_samples"] == report["num_scored"] == 16
    if method == "full":
        assert report["metrics"]["accuracy"] > 0  # the comparison is not between empty answers


def test_merged_export_answers_as_its_adapter(trained, tmp_path):
    output, _, data = trained("lora")
    merged = merge_adapter(output, tmp_path / "merged", dtype=torch.float32)
    adapter_report = evaluate(output, data, tmp_path / "adapter-eval")
    merged_report = evaluate(merged, data, tmp_path / "merged-eval")
    assert merged_report["output_kind"] == "full"
    assert predictions(merged_report) == predictions(adapter_report)
    assert merged_report["metrics"] == adapter_report["metrics"]
    assert os.path.isfile(os.path.join(merged, "eval", "eval_report.json")) is False  # --output_dir respected


def test_report_files(trained, tmp_path):
    output, _, data = trained("full")
    evaluate(output, data, tmp_path, "--num_samples", "5", "--show_samples", "3", "--metrics", "wer,bleu")
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert {"model", "output_kind", "data", "metrics", "num_samples", "skipped", "settings", "samples"} <= set(report)
    assert {"accuracy", "wer", "bleu"} <= set(report["metrics"]) and report["num_samples"] == 5
    for sample in report["samples"]:
        assert {"where", "task", "prompt", "prediction", "reference"} <= set(sample)
        assert sample["prompt"].startswith("<|im_start|>user") and sample["where"].startswith(data)
    markdown = (tmp_path / "eval_report.md").read_text()
    assert "| metric | value |" in markdown and f"| wer | {report['metrics']['wer']:.4f} |" in markdown
    assert "## First 3 samples" in markdown
    assert markdown.count(f"| {data}:") == 3  # one table row per shown sample
    # Without --output_dir the report goes next to the model.
    evaluate_recipe.main([str(output), "--data", data, "--num_samples", "2"])
    assert (output / "eval" / "eval_report.json").exists()


def test_bad_samples_are_skipped_counted_and_listed(trained, tmp_path):
    output, _, data = trained("full")
    folder = tmp_path / "data"
    shutil.copytree(os.path.dirname(data), folder)
    lines = (folder / "eval.jsonl").read_text().splitlines()[:6]
    missing = json.loads(lines[0])
    missing["messages"][0]["content"][0]["path"] = "media/nowhere.wav"
    (folder / "eval.jsonl").write_text("\n".join([*lines, json.dumps(missing)]) + "\n")
    args = ["--on_bad_sample", "skip", "--prepared_data_dir", str(tmp_path / "prepared")]
    report = evaluate(output, folder / "eval.jsonl", tmp_path / "eval", *args)
    [prepared] = report["skipped"]["preparation"].values()
    assert prepared["read"] == 7 and prepared["kept"] == 6 and report["num_samples"] == 6
    # A media file changed after preparation fails when loaded: skipped, listed and left out of the scores.
    image = json.loads(lines[2])["messages"][0]["content"][0]["path"]
    (folder / image).write_bytes(b"changed")
    report = evaluate(output, folder / "eval.jsonl", tmp_path / "eval", *args)
    assert report["skipped"]["loading"] == [f"{folder / 'eval.jsonl'}:3"]
    assert report["num_scored"] == 5 and report["samples"][2]["prediction"] is None
    assert (
        "1 whose media failed to load, 1 skipped while preparing" in (tmp_path / "eval" / "eval_report.md").read_text()
    )
    with pytest.raises(Exception, match="eval.jsonl:3"):  # on_bad_sample error (the default): the sample named
        evaluate(output, folder / "eval.jsonl", tmp_path / "eval", "--prepared_data_dir", str(tmp_path / "p2"))


def test_wandb_offline_run_holds_the_table(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    output, _, data = trained("full")
    report = evaluate(output, data, tmp_path, "--report_to", "wandb", "--wandb_samples", "4")
    [run_dir] = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert report["wandb_run"] == run_dir
    [table] = glob.glob(os.path.join(run_dir, "files", "media", "table", "**", "*.table.json"), recursive=True)
    content = json.loads(open(table).read())
    assert content["columns"] == ["where", "task", "image", "audio", "prompt", "prediction", "reference"]
    assert len(content["data"]) == 4
    assert {row[2] for row in content["data"]} >= {"Image", None} and "Audio" in {row[3] for row in content["data"]}
    # The media themselves go with the table's run artifact, recorded in the run file (uploaded by `wandb sync`).
    recorded = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    assert b"media/images/" in recorded and b"media/audio/" in recorded and b"eval/accuracy" in recorded


def test_not_an_output_folder_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "eval.py"), str(tmp_path), "--data", "x.jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"mmpeft: {tmp_path}: not an mmpeft output")


@pytest.mark.multiprocess
def test_two_processes_give_the_one_process_report(trained, tmp_path):
    output, _, data = trained("full")
    args = ["--data", data, "--num_samples", "7", "--batch_size", "2"]  # 7: the second share is padded
    single = evaluate_recipe.main([str(output), *args, "--output_dir", str(tmp_path / "one")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml"),
            os.path.join(REPO, "recipes", "eval.py"),
            str(output),
            *args,
            "--output_dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": REPO},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("mmpeft | evaluate |") == 1  # written once, by the main process
    double = json.loads((tmp_path / "two" / "eval_report.json").read_text())
    assert double["settings"].pop("num_processes") == 2 and single["settings"].pop("num_processes") == 1
    for report in (single, double):
        report.pop("seconds")
    assert double == single


def as_request(record: dict, folder: str) -> list[dict]:
    """The OpenAI-style messages of an eval record's prompt: images by path (the server's media_dir), audio as
    base64 `input_audio`."""
    messages = []
    for message in record["messages"][:-1]:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for part in [] if isinstance(content, str) else content:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": part["path"]}})
            elif part["type"] == "audio":
                data = base64.b64encode(open(os.path.join(folder, part["path"]), "rb").read()).decode()
                parts.append({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return messages


@pytest.mark.parametrize("kind", ["lora", "full", "qlora", "merged"])
def test_the_server_answers_as_evaluation_for_every_kind_of_output(kind, trained, tmp_path):
    from fastapi.testclient import TestClient

    from mmpeft.inference import load_for_inference
    from mmpeft.serving import ServeSettings, create_app

    output, trainer, data = trained("lora" if kind == "merged" else kind)
    model_dir = merge_adapter(output, tmp_path / "merged", dtype=torch.float32) if kind == "merged" else output
    answers = evaluate_generation(trainer.model, trainer.processing_class, trainer.generation_dataset).answers
    folder = os.path.dirname(data)
    with open(data) as file:
        records = [json.loads(line) for line in file][:3]
    app = create_app(*load_for_inference(model_dir), ServeSettings(model_name=kind, media_dir=folder))
    with TestClient(app) as client:
        for record, expected in zip(records, answers):
            body = {"messages": as_request(record, folder), "temperature": 0, "max_tokens": 32}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"].strip() == expected
