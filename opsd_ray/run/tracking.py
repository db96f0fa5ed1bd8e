"""Where a run's metrics go: metrics.jsonl (the record), TensorBoard, and Weights & Biases when asked.

One record per step (an evaluation before training is step 0). A resumed run, or a learner group
restarted from a checkpoint, redoes the steps after that checkpoint: metrics.jsonl and TensorBoard
drop what was logged after it and take the redone values; W&B keeps a run's steps increasing, so a
step it already holds is not sent again (the values agree up to float rounding: the redone step is
the same computation).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import uuid
from pathlib import Path

from opsd_ray.common import ConfigError
from opsd_ray.run.console import say
from opsd_ray.run.runfolder import RunFolder, WriteFailed


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a record, without its step."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars in the run folder; W&B with logging.wandb=true."""

    def __init__(self, run: RunFolder, keep_until_step: int, cfg=None):
        self.run, self.name = run, "metrics.jsonl"
        logged = run.read_jsonl(self.name)
        sent = max((r.get("step", 0) for r in logged), default=-1)  # what W&B may hold
        self.truncate_file(keep_until_step, logged)  # a resumed run drops what was logged after its checkpoint
        # TensorBoard writes local files: into the run folder, or a staging folder copied there
        self.tb_dir = run.local_path("tensorboard") or Path(tempfile.mkdtemp(prefix="opsd_ray_tb_"))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir), purge_step=keep_until_step + 1)
            _quiet_tensorboard_thread_errors()
        except ImportError:  # tensorboard is a dependency; stay usable without it
            print("tensorboard not installed: metrics go to metrics.jsonl only")
        self.wandb = WandbRun(run, cfg, sent) if cfg is not None and cfg.logging.wandb else None
        self.wandb_where = self.wandb.where if self.wandb else None  # for the end of the run

    def log(self, record: dict, after_training: bool = False) -> None:
        """One record; `after_training`: an evaluation of an earlier step, logged once training is done."""
        self.run.append_text(self.name, json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, after_training)
        if self.tb:
            try:
                for k, v in scalars(record).items():
                    self.tb.add_scalar(k.replace(".", "/"), v, record["step"])
                self.tb.flush()
            except OSError as e:  # TensorBoard writes from a thread and re-raises its error here
                self.close()
                self.tb = None
                raise WriteFailed(f"writing {self.tb_dir} failed: {type(e).__name__}: {e}") from e
            if not self.run.is_local:
                for f in self.tb_dir.iterdir():
                    self.run.write_bytes(f"tensorboard/{f.name}", f.read_bytes())

    def records(self) -> list[dict]:
        return self.run.read_jsonl(self.name)

    def truncate_file(self, step: int, logged: list[dict] | None = None) -> None:
        logged = self.run.read_jsonl(self.name) if logged is None else logged
        kept = [r for r in logged if r.get("step", 0) <= step]
        self.run.write_text(self.name, "".join(json.dumps(r) + "\n" for r in kept))

    def truncate(self, step: int) -> None:
        """Drop what was logged after `step` (a learner group restarted from that step's checkpoint)."""
        self.truncate_file(step)
        if self.tb:
            from torch.utils.tensorboard import SummaryWriter

            self.close()
            self.tb = SummaryWriter(str(self.tb_dir), purge_step=step + 1)

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()
            self.wandb = None
        if self.tb:
            try:
                self.tb.close()
            except OSError:  # a full disk: the write that failed first has already stopped the run
                pass


class WandbRun:
    """One W&B run per run folder: a resumed job continues it (its id is kept in wandb_id.txt).
    WANDB_MODE=offline keeps it in <run>/wandb/ (`wandb sync` uploads it later)."""

    def __init__(self, run: RunFolder, cfg, sent_step: int):
        import wandb
        from omegaconf import OmegaConf

        lg = cfg.logging
        if run.exists("wandb_id.txt"):
            run_id = run.read_text("wandb_id.txt").strip()
        else:
            run_id = re.sub(r"[^\w-]", "-", str(cfg.run.name))[:48] + "-" + uuid.uuid4().hex[:8]
            run.write_text("wandb_id.txt", run_id + "\n")
        folder = run.local_path() or Path(tempfile.mkdtemp(prefix="opsd_ray_wandb_"))
        self.sent_step = sent_step
        self.eval_axis = False
        try:
            self.run = wandb.init(
                project=lg.project, entity=lg.entity, name=lg.name or cfg.run.name, tags=list(lg.tags),
                config=OmegaConf.to_container(cfg, resolve=True), dir=str(folder), id=run_id, resume="allow",
                settings=wandb.Settings(silent=not lg.verbose, console="off"),
            )
        except wandb.errors.Error as e:  # no API key, a wrong entity or project, no network

            raise ConfigError(
                f"logging.wandb=true: W&B could not start the run ({type(e).__name__}: {' '.join(str(e).split())[:200]}). "
                "Log in (`wandb login`, or WANDB_API_KEY), check logging.entity / logging.project, or set "
                "WANDB_MODE=offline to keep the run in the run folder (`wandb sync` uploads it later)"
            ) from None
        where = f"offline, in {Path(self.run.dir).parent} (`wandb sync` uploads it)" if self.run.offline else self.run.url
        self.where = f"run {run_id}: {where}"
        say(f"W&B {self.where}")

    def log(self, record: dict, after_training: bool = False) -> None:
        if record["step"] > self.sent_step and not after_training:
            self.run.log(scalars(record), step=record["step"])
            self.sent_step = record["step"]
        elif after_training:
            # an evaluation of an earlier step (eval.schedule=end): W&B keeps its steps increasing, so
            # these metrics are plotted against their own axis, eval/step
            if not self.eval_axis:
                self.run.define_metric("eval/step")
                self.run.define_metric("eval/*", step_metric="eval/step")
                self.eval_axis = True
            self.run.log({**scalars(record), "eval/step": record["step"]})

    def finish(self) -> None:
        self.run.finish()


def _quiet_tensorboard_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a failed write, which Python prints as a traceback; the
    main thread gets the same error at its next flush and stops the run with a message instead."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "opsd_ray", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.opsd_ray = True
    threading.excepthook = hook
