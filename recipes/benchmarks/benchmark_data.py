"""Benchmark of the data path at scale: preparing, caching, memory-mapping and streaming manifests of 10k, 100k and
1M records.

    python recipes/benchmarks/benchmark_data.py                 # 10k, 100k, 1M records: ~35 min on 2 CPU cores
    python recipes/benchmarks/benchmark_data.py --sizes 10000   # one size
    python recipes/benchmarks/benchmark_data.py --quick         # 300 records, in ~30 s (the test suite runs it)

Manifests (JSONL) reference a pool of generated media -- 640x480 JPEG photos-like images and 2-10 s 16 kHz WAV
clips -- in image-only, audio-only, image + audio and text-only records of one to three turns. Processor: the tiny
reference model's (the processor, not the model, sets the cost of preparing). For each size it reports:

- preparation wall time and samples/s per `validate_media` policy, with all preparation workers (and with one);
- the resident memory of a training process after its data is loaded and one step is taken, and its growth per
  prepared sample between the smallest and each larger size;
- `make_row` on conversations of 50 to 1,600 turns, and on over-long ones (1,600 turns, one 50 MB line): time and
  Python memory peak (over-long ones are refused before the per-turn work);
- a cached restart's time to the first training step, and streaming's time to the first training step (each
  measured from the call of `mmpeft.training.run`, in a fresh process, imports excluded);

and writes `benchmark_data.md` / `.json` into `--output` (default: a temporary folder). `decode` is run at the
smallest size only unless `--decode-sizes` says otherwise: at 10-30 ms a sample it takes hours at 1M.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from benchmark_methods import machine_description  # noqa: E402


QUESTIONS = ["What is in the picture?", "Describe the sound.", "What do you see and hear?", "Tell me more."]
ANSWERS = ["A red house by the sea.", "A low steady tone.", "A dog barking in a park.", "It is late afternoon."]


def make_media(folder: str, images: int, clips: int, seed: int = 0) -> dict[str, list[str]]:
    """A pool of 640x480 JPEGs and 2-10 s 16 kHz WAVs under `folder/media`, as paths relative to `folder`."""
    import soundfile
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "media"), exist_ok=True)
    pool = {"image": [], "audio": []}
    for index in range(images):
        gradient = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
        pixels = np.clip(gradient + rng.normal(0, 40, (480, 640, 3)), 0, 255).astype(np.uint8)
        path = f"media/image_{index}.jpg"
        Image.fromarray(pixels).save(os.path.join(folder, path), quality=90)
        pool["image"].append(path)
    for index in range(clips):
        seconds = rng.uniform(2, 10)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(t.size)
        path = f"media/clip_{index}.wav"
        soundfile.write(os.path.join(folder, path), wave.astype(np.float32), 16000, subtype="PCM_16")
        pool["audio"].append(path)
    return pool


def write_manifest(path: str, records: int, pool: dict, seed: int = 0) -> str:
    """`records` JSONL lines: a quarter each image-only, audio-only, image + audio and text-only; 1-3 turns."""
    rng = random.Random(seed)
    with open(path, "w") as file:
        lines = []
        for index in range(records):
            kind = index % 4
            media = []
            if kind in (0, 2):
                media.append({"type": "image", "path": rng.choice(pool["image"])})
            if kind in (1, 2):
                media.append({"type": "audio", "path": rng.choice(pool["audio"])})
            messages = []
            for turn in range(rng.randint(1, 3)):
                text = {"type": "text", "text": f"{rng.choice(QUESTIONS)} ({index}.{turn})"}
                messages.append({"role": "user", "content": ([*media, text] if turn == 0 else [text])})
                messages.append({"role": "assistant", "content": rng.choice(ANSWERS)})
            lines.append(json.dumps({"messages": messages}))
            if len(lines) == 10_000:
                file.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            file.write("\n".join(lines) + "\n")
    return path


def prepare(manifest: str, cache: str, policy: str, workers: int | None) -> dict:
    """Prepare `manifest` into a fresh `cache`, in this process (its workers fork from it); time it."""
    from mmpeft.data.preparation import prepare_source
    from mmpeft.models import MMPeftProcessor
    from mmpeft.training import DataArguments, reference_checkpoint

    processor = MMPeftProcessor.from_pretrained(reference_checkpoint())
    defaults = DataArguments()  # the recipe's settings, so that its restart finds this cache entry
    start = time.perf_counter()
    prepared = prepare_source(
        manifest, processor, cache, max_length=defaults.max_length, validate_media=policy, num_workers=workers
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": len(prepared.rows), "samples_per_second": len(prepared.rows) / seconds}


CHILD = """
import json, time
import psutil
from transformers import TrainerCallback
from mmpeft.training import parse_args, run

start_of = {"main": time.perf_counter()}

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if "first_step" not in start_of:
            start_of["first_step"] = time.perf_counter() - start_of["main"]
            start_of["rss_mb"] = psutil.Process().memory_info().rss / 2**20
            # Anonymous memory: the process's own; the rest of RSS is pages of the memory-mapped Arrow files
            # (shared by every process on the machine, dropped by the kernel under memory pressure).
            status = dict(line.split(":", 1) for line in open("/proc/self/status"))
            start_of["rss_anon_mb"] = int(status["RssAnon"].split()[0]) / 1024

run(*parse_args(%(args)r)[:4], callbacks=[FirstStep()])
print("BENCHMARK " + json.dumps({k: start_of[k] for k in ("first_step", "rss_mb", "rss_anon_mb")}))
"""


def first_step(manifest: str, cache: str, output: str, *extra: str) -> dict:
    """Train on `manifest` in a fresh process (`mmpeft.training.run`, as the recipe does) up to the end of its first
    optimizer step: seconds from the call to the end of that step, and the process's resident memory then."""
    args = [
        "--train_data", manifest, "--prepared_data_dir", cache, "--output_dir", output, "--max_steps", "1",
        "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    code = CHILD % {"args": args}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"recipe run failed:\n{result.stderr[-3000:]}")
    [line] = [line for line in result.stdout.splitlines() if line.startswith("BENCHMARK ")]
    measured = json.loads(line.removeprefix("BENCHMARK "))
    measured["first_step_s"] = measured.pop("first_step")
    measured["reused_cache"] = "0 data sources prepared, 1 reused from the cache" in result.stdout
    return measured


def long_conversations(turns: list[int], line_mb: int, max_length: int = 4096) -> list[dict]:
    """Time `make_row` on conversations of many turns (within any limit: kept; and over `max_length`: refused) and
    on one line of `line_mb` MB of text (refused), with the peak of Python memory it took."""
    import tracemalloc

    from mmpeft.data import Record
    from mmpeft.data.dataset import OverlongError, make_row
    from mmpeft.models import MMPeftProcessor
    from mmpeft.training import reference_checkpoint

    processor = MMPeftProcessor.from_pretrained(reference_checkpoint())

    def conversation(count: int) -> dict:
        messages = [{"role": "system", "content": "Be brief."}]
        for turn in range(count // 2):
            messages += [
                {"role": "user", "content": f"{QUESTIONS[turn % 4]} ({turn})"},
                {"role": "assistant", "content": ANSWERS[turn % 4]},
            ]
        return {"messages": messages}

    cases = [(f"{count} turns", conversation(count), None) for count in turns]
    cases += [(f"{max(turns)} turns", conversation(max(turns)), max_length)]
    text = "word " * (line_mb << 18)  # 5 bytes a word: line_mb MB
    long_line = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ANSWERS[0]}]}
    cases += [(f"one {line_mb} MB line", long_line, max_length)]
    results = []
    for name, data, limit in cases:

        def prepare():
            try:
                return make_row(Record(data, name), processor, limit)["num_tokens"], "kept"
            except OverlongError as error:
                return None, f"refused ({error.reason})"

        start = time.perf_counter()
        tokens, outcome = prepare()
        seconds = time.perf_counter() - start
        tracemalloc.start()  # a second time, traced (tracing slows Python down: not timed)
        prepare()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        results.append({"case": name, "max_length": limit, "tokens": tokens, "outcome": outcome,
                        "seconds": seconds, "peak_mb": peak})  # fmt: skip
        print(f"make_row, {name}, max_length {limit}: {outcome} in {seconds:.2f} s, peak {peak:.0f} MB", flush=True)
    return results


def run(args) -> dict:
    from mmpeft.data.preparation import default_num_workers

    workers = default_num_workers()
    folder = args.output or tempfile.mkdtemp(prefix="mmpeft-benchmark-data-")
    pool = None if args.measure_only else make_media(folder, *((4, 4) if args.quick else (64, 32)))
    results = {"machine": machine_description(), "workers": workers, "sizes": {}}
    if not args.measure_only:
        results["conversations"] = long_conversations([50, 200] if args.quick else [50, 100, 200, 400, 1600],
                                                      line_mb=5 if args.quick else 50)  # fmt: skip
    for size in args.sizes:
        manifest = os.path.join(folder, f"manifest_{size}.jsonl")
        if not args.measure_only:  # (rewriting it would change its modification time: the caches would not match)
            write_manifest(manifest, size, pool)
        entry = results["sizes"][size] = {"prepare": {}}
        policies = ["header", "none"] + (["decode"] if size in args.decode_sizes else [])
        for policy in [] if args.measure_only else policies:
            runs = {"all": prepare(manifest, os.path.join(folder, f"cache-{size}-{policy}"), policy, None)}
            if size in args.single_worker_sizes and workers > 1:
                runs["one"] = prepare(manifest, os.path.join(folder, f"cache-{size}-{policy}-1"), policy, 1)
            entry["prepare"][policy] = runs
            print(f"{size} records, {policy}: {json.dumps(runs)}", flush=True)
        # The header cache is complete: a restart reuses it.
        cache = os.path.join(folder, f"cache-{size}-header")
        entry["cached_restart"] = first_step(
            manifest, cache, os.path.join(folder, "run"), "--validate_media", "header"
        )
        entry["streaming"] = first_step(manifest, cache, os.path.join(folder, "run"), "--streaming", "true")
        print(f"{size} records: restart {entry['cached_restart']}, streaming {entry['streaming']}", flush=True)
        smallest = results["sizes"][min(results["sizes"])]["cached_restart"]
        if size != min(results["sizes"]):
            for name in ("rss", "rss_anon"):
                grown = entry["cached_restart"][f"{name}_mb"] - smallest[f"{name}_mb"]
                entry[f"{name}_per_sample_bytes"] = grown * 2**20 / (size - min(results["sizes"]))
        results["table"] = table(results)
        with open(os.path.join(folder, "benchmark_data.json"), "w") as file:  # after each size: partial results
            json.dump(results, file, indent=2)
        with open(os.path.join(folder, "benchmark_data.md"), "w") as file:
            file.write(results["table"] + "\n")
    print(f"\n{results['machine']}; {workers} preparation workers\n\n{results['table']}\n\nwritten to {folder}")
    return results


def table(results: dict) -> str:
    rows = [
        "| records | validate_media | prepare, all workers | samples/s | prepare, 1 worker |",
        "|---|---|---|---|---|",
    ]
    for size, entry in results["sizes"].items():
        for policy, runs in entry["prepare"].items():
            one = f"{runs['one']['seconds']:.1f} s" if "one" in runs else "-"
            rows.append(
                f"| {size:,} | {policy} | {runs['all']['seconds']:.1f} s | {runs['all']['samples_per_second']:.0f} "
                f"| {one} |"
            )
    rows += [
        "",
        "| records | cached restart to 1st step | streaming to 1st step | RSS after 1st step (anonymous) "
        "| growth per sample over the smallest: RSS (anonymous) |",
        "|---|---|---|---|---|",
    ]
    for size, entry in results["sizes"].items():
        restart = entry["cached_restart"]
        growth = "-"
        if "rss_per_sample_bytes" in entry:
            growth = f"{entry['rss_per_sample_bytes']:.0f} B ({entry['rss_anon_per_sample_bytes']:.0f} B)"
        rows.append(
            f"| {size:,} | {restart['first_step_s']:.1f} s | {entry['streaming']['first_step_s']:.1f} s "
            f"| {restart['rss_mb']:.0f} MB ({restart['rss_anon_mb']:.0f} MB) | {growth} |"
        )
    if results.get("conversations"):
        rows += ["", "| make_row on | max_length | outcome | time | Python memory peak |", "|---|---|---|---|---|"]
        rows += [
            f"| {run['case']} | {run['max_length'] or '-'} | {run['outcome']} | {run['seconds']:.2f} s "
            f"| {run['peak_mb']:.0f} MB |"
            for run in results["conversations"]
        ]
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--decode-sizes", type=int, nargs="*", default=None, help="default: the smallest size")
    parser.add_argument("--single-worker-sizes", type=int, nargs="*", default=None, help="default: the smallest")
    parser.add_argument("--output", default=None, help="folder for data, caches and results (default: temporary)")
    parser.add_argument("--quick", action="store_true", help="300 records: checks that it all runs")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="skip preparing: measure restarts and streaming against the caches an earlier run left in --output",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = [300]
    args.decode_sizes = [min(args.sizes)] if args.decode_sizes is None else args.decode_sizes
    args.single_worker_sizes = [min(args.sizes)] if args.single_worker_sizes is None else args.single_worker_sizes
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run(args)


if __name__ == "__main__":
    main()
