"""The reference checkpoint built by several processes at once."""

import os
import subprocess
import sys


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
