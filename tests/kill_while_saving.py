"""Runs recipes/finetune.py and SIGKILLs itself in the middle of writing the checkpoint of step
`KILL_AT_STEP`: after the weights and the optimizer state, before the RNG states and trainer state."""

import os
import signal
import sys

from transformers import Trainer


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_helpers import finetune  # noqa: E402


save_rng_state = Trainer._save_rng_state


def _save_rng_state_or_die(self, output_dir):
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)


Trainer._save_rng_state = _save_rng_state_or_die

if __name__ == "__main__":
    finetune.main(sys.argv[1:])
