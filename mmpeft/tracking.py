"""W&B in one place, for training runs, evaluations and comparison reports alike: offline unless an API key is
configured (never a prompt or a hang), the run under the output folder, grouped and tagged so that runs to compare
sit side by side, and finished on the way out.

transformers' `WandbCallback` creates a training run's W&B run from environment variables (`WANDB_DIR`,
`WANDB_PROJECT`, `WANDB_RUN_GROUP`, `WANDB_TAGS`, `WANDB_MODE`). `WandbTracking` sets them for one run and puts back
what was there before, then finishes the run and tears the W&B service down, so that several runs in one process
(the comparison of methods, the benchmarks, a notebook) each get their own folder, group and tags.
"""

import logging
import os
import sys


logger = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """Whether a W&B API key is configured (environment or ~/.netrc): runs go online, else offline."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.exists(netrc) and "api.wandb.ai" in open(netrc).read()


class WandbTracking:
    """Context manager around one W&B run (a no-op when not `enabled`).

        with WandbTracking(output_dir, project="mmpeft", tags=["lora"]) as tracking:
            trainer.train()  # transformers' WandbCallback starts the run; or `tracking.init(...)` starts one
            location = tracking.finish()  # the run's URL, or its folder when offline

    The user's own `WANDB_DIR`, `WANDB_PROJECT` and `WANDB_MODE` are kept; otherwise the run goes under
    `output_dir`, in `project`, offline without an API key.
    """

    VARIABLES = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_TAGS")

    def __init__(
        self, output_dir: str, project: str, *, group: str | None = None, tags: list[str] = (), enabled: bool = True
    ):
        self.output_dir, self.project, self.group, self.tags, self.enabled = output_dir, project, group, tags, enabled
        self._saved = {}

    @classmethod
    def for_training(cls, training_args, tags: list[str] = ()) -> "WandbTracking":
        """The tracking of a training run: on when `report_to` includes `wandb`, with its project, group and tags."""
        return cls(
            training_args.output_dir,
            training_args.wandb_project,
            group=training_args.wandb_group,
            tags=[*tags, *training_args.wandb_tags],
            enabled="wandb" in training_args.report_to,
        )

    def __enter__(self) -> "WandbTracking":
        if not self.enabled:
            return self
        self._saved = {name: os.environ.get(name) for name in self.VARIABLES}
        if "WANDB_MODE" not in os.environ and not wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"
            logger.info("W&B: no API key configured, logging offline (sync later with `wandb sync`).")
        os.environ.setdefault("WANDB_DIR", os.path.abspath(self.output_dir))
        os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
        os.environ.setdefault("WANDB_PROJECT", self.project)
        if self.group:
            os.environ["WANDB_RUN_GROUP"] = self.group
        if self.tags:
            os.environ["WANDB_TAGS"] = ",".join(dict.fromkeys(self.tags))
        return self

    def init(self, **settings):
        """Start a W&B run of mmpeft's own (an evaluation's table, a comparison report) with this tracking's folder,
        project, group and tags; `settings` go to `wandb.init` (name, job_type, config ...)."""
        import wandb

        return wandb.init(
            project=os.environ["WANDB_PROJECT"],
            dir=os.environ["WANDB_DIR"],
            group=self.group,
            tags=list(dict.fromkeys(self.tags)) or None,
            reinit="finish_previous",
            **settings,
        )

    def finish(self) -> str | None:
        """Finish the W&B run (so that it is complete on disk) and return its URL, or its folder when offline;
        None when there is no run. Safe to call again."""
        wandb = sys.modules.get("wandb")
        if wandb is None or wandb.run is None:
            return None
        run = wandb.run
        location = os.path.dirname(run.dir) if run.settings.mode == "offline" else run.url
        run.finish()
        wandb.teardown()  # a later run in this process reads its settings anew
        return location

    def __exit__(self, *exc_info):
        if not self.enabled:
            return
        self.finish()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


__all__ = ["WandbTracking", "wandb_logged_in"]
