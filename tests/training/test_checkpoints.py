"""The output folder's lock, and the reference checkpoint built by several processes at once."""

import os
import signal
import subprocess
import sys

from recipe_helpers import REPO, TINY

from mmpeft.training import lock_output_dir
from mmpeft.training.checkpoints import LOCK_FILE


RECIPE = os.path.join(REPO, "recipes", "finetune.py")
HOLD_LOCK = """
import sys, time
from mmpeft.training import lock_output_dir
lock = lock_output_dir(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_output_folder_is_refused_and_touches_nothing(tmp_path):
    output = tmp_path / "run"
    half_written = output / "checkpoint-4"  # as the first run is writing it
    half_written.mkdir(parents=True)
    lock = lock_output_dir(str(output))
    try:
        arguments = [*TINY, "--output_dir", str(output), "--auto_resume", "true", "--report_to", "none"]
        result = subprocess.run([sys.executable, RECIPE, *arguments], capture_output=True, text=True, timeout=120)
    finally:
        lock.close()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"mmpeft: output_dir {output} is in use by another run (pid {os.getpid()} on {os.uname().nodename}); wait "
        "for it to end or choose another output_dir."
    )
    assert half_written.is_dir() and sorted(os.listdir(output)) == [LOCK_FILE, "checkpoint-4"]


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert "held\n" in holder.stdout  # read up to that line (imports may print before it)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock_output_dir(str(tmp_path)).close()


def test_processes_building_the_reference_checkpoint_at_once_all_get_it(tmp_path):
    build = "from mmpeft.training import reference_checkpoint; print(reference_checkpoint())"
    env = {**os.environ, "MMPEFT_CACHE": str(tmp_path)}
    processes = [
        subprocess.Popen([sys.executable, "-c", build], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = [(*process.communicate(timeout=300), process.returncode) for process in processes]
    assert [code for _, _, code in results] == [0, 0, 0], [err.decode()[-2000:] for _, err, _ in results]
    assert {out.decode().splitlines()[-1] for out, _, _ in results} == {str(tmp_path / "tiny-omni-v1")}
    assert os.listdir(tmp_path) == ["tiny-omni-v1"]  # no build folder left behind
    assert (tmp_path / "tiny-omni-v1" / "model.safetensors").is_file()
