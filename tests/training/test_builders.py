import json

from mmpeft.training import DataArguments, load_datasets


def write(path, answers):
    with open(path, "w") as file:
        for answer in answers:
            file.write(
                json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]})
                + "\n"
            )
    return str(path)


def test_datasets_are_mixed_by_weight_and_split_for_eval(tmp_path, tok):
    from tiny_parts import build

    processor = build(vision=None, audio=None, tok=tok)[1]
    a = write(tmp_path / "a.jsonl", [f"a{i}" for i in range(10)])
    b = write(tmp_path / "b.jsonl", [f"b{i}" for i in range(10)])
    args = DataArguments(train_data=[a, {"path": b, "weight": 2.5}])
    train, evaluation, reports = load_datasets(args, processor, str(tmp_path / "out"))
    sources = [where.split(".jsonl")[0][-1] for where in train.rows["where"]]
    assert sources.count("a") == 10 and sources.count("b") == 25  # b: twice over, plus half of it drawn once more
    assert evaluation is None and reports[a]["kept"] == 10
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())[b]["read"] == 10

    args = DataArguments(train_data=[a, b], eval_fraction=0.25)
    train, evaluation, _ = load_datasets(args, processor)
    assert len(evaluation) == 5 and len(train) == 15
    assert not set(evaluation.rows["where"]) & set(train.rows["where"])
