"""Checkpoints of a run: where a job starts from, what a step saves, and getting a group back to one.

A checkpoint is `checkpoints/step_<N>/` in the run folder: the learner's adapter (with its model card),
optimizer and RNG, and `trainer_state.json` (step, data position), written last: it marks the
checkpoint complete. Its torch files hold tensors and plain values only, and are checked before a job
starts from them (a pickle that would run code is refused).
"""

from __future__ import annotations

import json

from opsd_ray.common import ConfigError
from opsd_ray.models.loading import resolve_model_path
from opsd_ray.run.console import say
from opsd_ray.run.runfolder import RunFolder
from opsd_ray.tools.modelcard import last_evaluation, model_card
from opsd_ray.workers.learner import UnsafeCheckpoint, load_plain


def latest_checkpoint(run: RunFolder) -> str | None:
    """Newest complete checkpoint (relative path): one without trainer_state.json is not complete."""
    steps = [n for n in run.listdir("checkpoints") if n.startswith("step_")
             and run.exists(f"checkpoints/{n}/trainer_state.json")]
    newest = max(steps, key=lambda n: int(n.split("_")[1]), default=None)
    return f"checkpoints/{newest}" if newest else None


def resume_hint(run: RunFolder) -> str:
    try:
        last = latest_checkpoint(run)
    except OSError:  # the storage itself is failing
        return f"Its newest complete checkpoint under {run.uri('checkpoints')} is intact."
    if last is None:
        return "No checkpoint was written."
    return f"The last complete checkpoint is {run.uri(last)} (checkpoint.resume=auto continues from it)."


def start_checkpoint(cfg, run: RunFolder) -> tuple[RunFolder, str] | None:
    """The checkpoint this job starts from, as checkpoint.resume says: (folder, path in it), or None."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        latest = latest_checkpoint(run)
        return (run, latest) if latest else None
    return RunFolder(cfg.checkpoint.resume), ""


def check_checkpoint(checkpoint: tuple[RunFolder, str] | None) -> None:
    """Refuse a checkpoint whose torch files hold more than tensors and plain values (their pickles
    could run code when loaded), before any actor starts."""
    if checkpoint is None:
        return
    source, rel = checkpoint
    for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "rng.pt"):
        if not source.exists(f"{rel}/{name}" if rel else name):
            raise ConfigError(f"checkpoint {source.uri(rel)} has no {name}: not a complete checkpoint (expected a "
                              "checkpoints/step_<N> folder of a run)")
    for name in ("optimizer.pt", "rng.pt"):
        try:
            load_plain(source.read_bytes(f"{rel}/{name}" if rel else name), name)
        except UnsafeCheckpoint as e:
            raise ConfigError(f"checkpoint {source.uri(rel)}: {e}. Resume from a checkpoint that opsd_ray wrote, "
                              "or start afresh with checkpoint.resume=never") from None


def checkpoint_step(checkpoint: tuple[RunFolder, str] | None) -> int:
    """The step a checkpoint was saved after (0 without one)."""
    if checkpoint is None:
        return 0
    source, rel = checkpoint
    return int(json.loads(source.read_text(f"{rel}/trainer_state.json" if rel else "trainer_state.json"))["step"])


def saves(cfg, step: int) -> bool:
    """Whether a checkpoint is saved after `step` (checkpoint.every, and the last step)."""
    return bool(cfg.checkpoint.every) and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps)


def restore(learner, sampler, checkpoint: tuple[RunFolder, str] | None, fresh: dict) -> int:
    """The learner group and the sampler as `checkpoint` left them; the step to continue after (0 without
    one: the sampler goes back to `fresh`, its initial state, and the learners keep their initial weights)."""
    if checkpoint is None:
        sampler.load_state_dict(fresh)
        return 0
    source, rel = checkpoint
    files = source.read_files(rel)
    state = json.loads(files.pop("trainer_state.json"))
    learner.load_checkpoint(files)
    sampler.load_state_dict(state["sampler"])
    say(f"resumed from {source.uri(rel)} (step {state['step']})")
    return int(state["step"])


def save_checkpoint(cfg, learner, run: RunFolder, step: int, sampler_state: dict, records: list[dict] = ()) -> str:
    """Learner rank 0's adapter, optimizer and RNG, written by the driver into its run folder with a
    model card; trainer_state.json (step, data position) goes last: it marks the checkpoint complete."""
    files = with_card(cfg, learner.whole("checkpoint_files"), step, records)
    state = {"step": step, "sampler": sampler_state, "run": cfg.run.name}
    files["trainer_state.json"] = (json.dumps(state, indent=2) + "\n").encode()
    return run.write_files(f"checkpoints/step_{step}", files, last="trainer_state.json")


def with_card(cfg, files: dict[str, bytes], step: int, records: list[dict]) -> dict[str, bytes]:
    """An adapter's files with our model card as README.md (in place of peft's empty template)."""
    card = model_card(cfg, resolve_model_path(cfg.model), step, last_evaluation(records))
    return {**files, "README.md": card.encode()}
