"""The driver (also the Ray job entrypoint): the paper's algorithm, one step at a time.

    for step in 1..T:
        q, r      <- sample a batch of prompts
        y_hat     <- rollout: the student pi_theta writes its solutions            (RolloutWorker x R)
        frozen    <- scoring: pi_0 reads y_hat under (q, r), (r) and (q) at once  (ScoringWorker x S)
        theta     <- learner: JSD(pi_theta || P_target) with P_target from frozen (Learner x N)
        sync      <- the new adapter goes to every rollout worker

Within a step the work streams between the roles as it finishes (opsd_ray.run.schedule; or phase by
phase with train.schedule=phases). With rollout.max_staleness=1 the rollout of step k+1 runs with
adapter k-1 while step k learns (one-step-off). The driver owns the run folder (opsd_ray.run.runfolder).
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime
from pathlib import Path

from opsd_ray.common import ConfigError, RunStopped
from opsd_ray.data.contexts import drop_unfit, model_positions
from opsd_ray.data.prompts import PROMPT_OF, build_prompt_ids
from opsd_ray.data.sources import PromptSampler, load_examples, token_counter, tokenizer_id
from opsd_ray.eval.markers import marker_record
from opsd_ray.run.cluster import check_fits, init_ray, role_requests
from opsd_ray.run.console import engine_logs, say
from opsd_ray.run.evaluation import eval_points, evaluate, evaluate_checkpoints, inline
from opsd_ray.run.faults import LearnersLost
from opsd_ray.run.roles import Roles, adapter_config, adapter_dtype
from opsd_ray.run.runfolder import DriverLock, RunFolder, WriteFailed
from opsd_ray.run.schedule import Rollout, drain
from opsd_ray.run.sync_check import SyncCheck, probe_sequence
from opsd_ray.run.tracking import MetricsLog
from opsd_ray.workers.learner import UnsafeCheckpoint, load_plain
from opsd_ray.workers.scoring import VARIANTS


# ----------------------------------------------------------------------------- run folder
def run_folder(cfg) -> RunFolder:
    if not cfg.run.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run.name = f"{cfg.model.name}-{cfg.data.name}-{cfg.objective.mode}-{stamp}"
    return RunFolder(cfg.run.output_dir.rstrip("/") + "/" + cfg.run.name)


def latest_checkpoint(run: RunFolder) -> str | None:
    """Newest complete checkpoint (relative path): one without trainer_state.json is not complete."""
    steps = [n for n in run.listdir("checkpoints") if n.startswith("step_")
             and run.exists(f"checkpoints/{n}/trainer_state.json")]
    newest = max(steps, key=lambda n: int(n.split("_")[1]), default=None)
    return f"checkpoints/{newest}" if newest else None


def saves(cfg, step: int) -> bool:
    """Whether a checkpoint is saved after `step` (checkpoint.every, and the last step)."""
    return bool(cfg.checkpoint.every) and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps)


def step_variants(cfg, step: int) -> tuple[tuple[str, ...], bool]:
    """(the frozen variants a step needs, whether it logs the decomposition diagnostics). PMI needs
    all three; standard OPSD the teacher, plus the reference probe on diagnostics steps."""
    every = cfg.train.diagnostics_every
    diagnostics = every > 0 and (step % every == 0 or step == 1)
    if cfg.objective.mode == "pmi":
        return VARIANTS, diagnostics
    return (("teacher", "reference_only") if diagnostics else ("teacher",)), diagnostics


def request_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of one trajectory: depends on (run seed, step, position) only."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


# ----------------------------------------------------------------------------- the loop
def train(cfg) -> Path | str:
    """Train; returns the run folder (a Path, or the URI of a remote run folder)."""
    run = run_folder(cfg)
    lock = DriverLock(run)
    try:
        lock.acquire()  # one driver per run: a resubmitted job takes over once the old driver is gone
        return _train(cfg, run, lock)
    except WriteFailed as e:  # a full disk: what was written is intact, the run stops where it is
        raise RunStopped(f"{e}. {resume_hint(run)} Free space (or fix the storage), then run the same "
                         "command again") from e
    finally:
        lock.release()


def resume_hint(run: RunFolder) -> str:
    try:
        last = latest_checkpoint(run)
    except OSError:  # the storage itself is failing
        return f"Its newest complete checkpoint under {run.uri('checkpoints')} is intact."
    if last is None:
        return "No checkpoint was written."
    return f"The last complete checkpoint is {run.uri(last)} (checkpoint.resume=auto continues from it)."


def _train(cfg, run: RunFolder, lock: DriverLock) -> Path | str:
    import ray

    from opsd_ray.config.recipes import config_yaml
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.workers.engines import pick_engine

    check_checkpoint(start_checkpoint(cfg, run))  # before anything loads: a checkpoint must not run code
    run.write_text("config.yaml", config_yaml(cfg))
    tok = load_tokenizer(cfg.model)
    examples, report = load_examples(cfg.data, token_counter(tok), seed=cfg.run.seed, tokenizer_id=tokenizer_id(cfg.model))
    examples, over, limits = drop_unfit(examples, tok, cfg)  # never a cut context: rows that do not fit go
    report.add_contexts(limits.limits, limits.new_tokens, over, report.valid - len(examples))
    if not examples:
        raise ConfigError(f"no row fits the models' context windows ({report.summary()}): lower "
                          "rollout.max_new_tokens or data.max_reference_tokens / data.max_question_tokens")
    run.write_text("data_report.json", report.to_json())
    print(report.summary(), flush=True)
    engine = pick_engine(cfg.rollout.engine, cfg.model.lora.r)
    sampler = PromptSampler(examples, cfg.train.batch_size, seed=cfg.run.seed)
    with engine_logs(run, cfg.logging.verbose) as logs_at:
        started_ray = init_ray(cfg)
        try:
            final, wandb_where = train_loop(cfg, run, lock, engine, sampler, tok)
        finally:
            if started_ray:  # stopped here, so that its last worker lines reach the log file
                ray.shutdown()
    print(f"\ndone: {cfg.train.steps} steps", flush=True)
    places = {"metrics": run.uri("metrics.jsonl"), "tensorboard": run.uri("tensorboard"), "wandb": wandb_where,
              "adapter": f"{final} (README.md: its model card)", "checkpoints": run.uri("checkpoints"),
              "report": write_report(run), "logs": logs_at, "config": run.uri("config.yaml")}
    for name, where in places.items():
        if where:
            print(f"  {name + ':':<13}{where}", flush=True)
    return run.local_path() or str(run)


def train_loop(cfg, run: RunFolder, lock: DriverLock, engine: str, sampler: PromptSampler,
               tok) -> tuple[str, str | None]:
    """Start the roles and run the steps (restarting the learner group when one is lost); returns
    where the final adapter was written, and where the W&B run is (None without W&B)."""
    import ray
    from tqdm import tqdm

    one_step_off = cfg.rollout.max_staleness == 1
    points = eval_points(cfg)
    check = SyncCheck(cfg.rollout.verify_sync_every, probe_sequence(tok, sampler.examples[0], cfg))
    fresh = sampler.state_dict()
    checkpoint = start_checkpoint(cfg, run)  # the newest this job may restart its learners from
    check_fits(role_requests(cfg), ray.cluster_resources())  # before anything is written or loaded
    log = MetricsLog(run, keep_until_step=checkpoint_step(checkpoint), cfg=cfg)  # then a W&B login problem
    roles = None
    try:
        roles = Roles(cfg, engine)
        start = restore(roles, sampler, checkpoint, fresh)
        adapter_conf, dtype = adapter_config(cfg), adapter_dtype(cfg, engine)
        say(f"run {cfg.run.name}: model={cfg.model.name} data={cfg.data.name} mode={cfg.objective.mode} "
            f"engine={engine} schedule={cfg.train.schedule}{' one-step-off' if one_step_off else ''}; {roles.where()}")
        bar = tqdm(total=cfg.train.steps, initial=start, desc="step", unit="step", dynamic_ncols=True)
        lost = None
        while True:
            try:
                if lost is not None:  # restart the group from the newest checkpoint, redo the steps since
                    start = bar.n = recover(roles, sampler, log, checkpoint, fresh, lost)
                version = roles.sync(adapter_conf, dtype)["version"]
                if inline(cfg) and start == 0 and lost is None:  # the base model's score, the curves' first point
                    log.log({"step": 0, **evaluate(cfg, roles, run, 0)})
                skips = SkipCounter.resumed(cfg.fault.max_skipped_steps, log.records())
                for record, ahead in steps(cfg, roles, sampler, tok, start + 1, version, adapter_conf, dtype, check):
                    step = record["step"]
                    record["skipped_steps"] = skips.add(step, record["skipped"])
                    if inline(cfg) and step in points:
                        record.update(evaluate(cfg, roles, run, step))
                    log.log(record)
                    bar.update()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if saves(cfg, step) or (step in points and not inline(cfg)):  # eval.schedule=end evaluates them
                        sampler_state = ahead.sampler_state if ahead else sampler.state_dict()
                        checkpoint = run, save_checkpoint(cfg, roles, run, step, sampler_state, log.records())
                    skips.check(run)
                    lock.check()
                adapter_files = roles.on_learners("adapter_files")
                break
            except LearnersLost as e:
                lost = e
        bar.close()
        final = run.write_files("final", with_card(cfg, adapter_files, cfg.train.steps, log.records()))
        if points and not inline(cfg):  # eval.schedule=end: the GPUs are free for evaluation now
            roles.shutdown()
            roles = None
            evaluate_checkpoints(cfg, run, log, engine)
        return final, log.wandb_where
    finally:
        log.close()
        if roles is not None:
            roles.shutdown()


def write_report(run: RunFolder) -> str | None:
    """The run's plots, summary.md and table.md (`opsd-ray report` of it) in <run>/report/."""
    from opsd_ray.tools.report import report

    try:
        local = run.local_path()
        if local is not None:
            return str(report([local]) / "summary.md")
        with tempfile.TemporaryDirectory() as tmp:  # a remote run folder: render locally, then copy
            copy = Path(tmp) / Path(str(run)).name
            copy.mkdir()
            for name in ("metrics.jsonl", "config.yaml"):
                (copy / name).write_bytes(run.read_text(name).encode())
            out = report([copy], Path(tmp) / "report")
            run.write_files("report", {f.name: f.read_bytes() for f in out.iterdir()})
        return run.uri("report/summary.md")
    except Exception as e:  # the run itself is complete: say so, and how to make the report again
        say(f"warning: the report was not written ({type(e).__name__}: {e}); `opsd-ray report {run.uri()}` "
            "makes it")
        return None


def recover(roles: Roles, sampler: PromptSampler, log: MetricsLog, checkpoint, fresh: dict,
            lost: LearnersLost) -> int:
    """A learner was lost: restart the learner group from `checkpoint` (or from the start), drop what
    was logged after it, and say how much is redone. Returns the step to continue after."""
    at = max((r["step"] for r in log.records()), default=0)
    roles.restart_learners(lost)
    start = restore(roles, sampler, checkpoint, fresh)
    log.truncate(start)
    origin = f"step {start} (its newest checkpoint)" if checkpoint else "the start (no checkpoint yet)"
    say(f"a learner was lost after step {at} was logged: the learner group restarted from {origin}; "
        f"redoing from step {start + 1} ({max(at - start, 0)} logged step(s) lost)")
    return start


def steps(cfg, roles: Roles, sampler: PromptSampler, tok, first: int, version: int, adapter_conf: dict,
          dtype: str = "float32", check: SyncCheck | None = None):
    """Steps first..train.steps of the algorithm; yields each step's record and, one-step-off, the
    next step's rollout, already running (its sampler state is what a checkpoint of this step keeps).
    `check`: the sync check after its steps' syncs (one-step-off: read when the next step has learnt,
    so that the probe does not wait for the rollout running meanwhile)."""
    one_step_off = cfg.rollout.max_staleness == 1
    ahead, probe = None, None
    for step in range(first, cfg.train.steps + 1):
        rollout = ahead or start_rollout(cfg, roles, sampler, tok, step)
        # one-step-off: the next rollout starts now, with the adapter the workers have (one behind)
        more = one_step_off and step < cfg.train.steps
        ahead = start_rollout(cfg, roles, sampler, tok, step + 1) if more else None
        started = time.time()
        record = train_step(cfg, roles, rollout, tok, step, version)
        if probe is not None:  # one-step-off: the previous sync's check
            record.update(check.finish(probe))
            probe = None
        if ahead is not None:
            drain(ahead, roles)  # what the next rollout finished during this step
        record.update(utilization(roles, started, time.time()))
        t0 = time.perf_counter()
        synced = roles.sync(adapter_conf, dtype, wait=ahead is None)
        version = synced["version"]
        record.update(finish_record(record, time.perf_counter() - t0, synced["bytes"]))
        if check is not None and check.due(step):
            probe = check.start(roles)
            if ahead is None:
                record.update(check.finish(probe))
                probe = None
        yield record, ahead


class SkipCounter:
    """Steps whose update was skipped for a non-finite loss or gradient norm; too many in a row stop the run."""

    def __init__(self, limit: int):
        self.limit, self.total, self.streak = limit, 0, []

    @classmethod
    def resumed(cls, limit: int, records: list[dict]) -> SkipCounter:
        """The count as the kept records of a resumed (or replaying) run left it."""
        counter = cls(limit)
        for r in records:
            if r.get("step", 0) > 0:
                counter.total += bool(r.get("skipped"))
                counter.streak = [*counter.streak, r["step"]] if r.get("skipped") else []
        return counter

    def add(self, step: int, skipped: int) -> int:
        if skipped:
            self.total += 1
            self.streak.append(step)
            say(f"warning: step {step}: non-finite loss or gradient norm, update skipped (the adapter is unchanged)")
        else:
            self.streak = []
        return self.total

    def check(self, run: RunFolder) -> None:
        if len(self.streak) < self.limit:
            return
        raise RunStopped(
            f"{len(self.streak)} steps in a row ({', '.join(map(str, self.streak))}) had a non-finite loss or "
            f"gradient norm (fault.max_skipped_steps={self.limit}); their updates were skipped. Likely causes: "
            "NaN or Inf in the model weights (a corrupted model.path or checkpoint), float16 overflow (use "
            "bfloat16), a very small objective.temperature, or a learner.lr high enough to diverge. "
            + resume_hint(run)
        )


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


def restore(roles: Roles, sampler: PromptSampler, checkpoint: tuple[RunFolder, str] | None, fresh: dict) -> int:
    """Learners and sampler as `checkpoint` left them; the step to continue after (0 without one: the
    sampler goes back to `fresh`, its initial state, and the learners are at their initial weights)."""
    import ray

    if checkpoint is None:
        sampler.load_state_dict(fresh)
        return 0
    source, rel = checkpoint
    files = source.read_files(rel)
    state = json.loads(files.pop("trainer_state.json"))
    shared = ray.put(files)
    roles.from_learners([learner.load_checkpoint_files.remote(shared) for learner in roles.learners])
    sampler.load_state_dict(state["sampler"])
    say(f"resumed from {source.uri(rel)} (step {state['step']})")
    return int(state["step"])


def save_checkpoint(cfg, roles: Roles, run: RunFolder, step: int, sampler_state: dict,
                    records: list[dict] = ()) -> str:
    """Learner rank 0's adapter, optimizer and RNG, written by the driver into its run folder with a
    model card; trainer_state.json (step, data position) goes last: it marks the checkpoint complete."""

    files = with_card(cfg, roles.on_learners("checkpoint_files"), step, records)
    state = {"step": step, "sampler": sampler_state, "run": cfg.run.name}
    files["trainer_state.json"] = (json.dumps(state, indent=2) + "\n").encode()
    return run.write_files(f"checkpoints/step_{step}", files, last="trainer_state.json")


def with_card(cfg, files: dict[str, bytes], step: int, records: list[dict]) -> dict[str, bytes]:
    """An adapter's files with our model card as README.md (in place of peft's empty template)."""
    from opsd_ray.models.loading import resolve_model_path
    from opsd_ray.tools.modelcard import last_evaluation, model_card

    card = model_card(cfg, resolve_model_path(cfg.model), step, last_evaluation(records))
    return {**files, "README.md": card.encode()}


def step_requests(cfg, tok, batch, step: int):
    """The batch's chat-formatted prompts and its rollout requests (example id, student prompt, seed)."""
    prompts = [build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt) for ex in batch]
    requests = [(ex.id, p.student, request_seed(cfg.run.seed, step, i)) for i, (ex, p) in enumerate(zip(batch, prompts))]
    return prompts, requests


def start_rollout(cfg, roles: Roles, sampler: PromptSampler, tok, step: int) -> Rollout:
    """Draw step `step`'s prompts and start generating them on the rollout workers."""
    before = sampler.state_dict()
    prompts, requests = step_requests(cfg, tok, sampler.next_batch(), step)
    return roles.launch(prompts, requests, step, before)


def train_step(cfg, roles: Roles, rollout: Rollout, tok, step: int, version: int) -> dict:
    """Score and learn from a launched rollout; the step's record (without the sync)."""
    t0 = time.time()
    variants, diagnostics = step_variants(cfg, step)
    result = roles.learn(cfg, rollout, variants, diagnostics)
    trajectories = result.trajectories
    lengths = [len(t.response_ids) for t in trajectories]
    limit = model_positions(cfg.model) or 10**9
    contexts = [len(getattr(p, PROMPT_OF[v])) + n for p, n in zip(rollout.prompts, lengths) for v in variants]
    texts = tok.batch_decode([t.response_ids for t in trajectories], skip_special_tokens=True)
    return {
        "step": step,
        "adapter_version_used": min(t.adapter_version for t in trajectories),
        "staleness": version - min(t.adapter_version for t in trajectories),
        **result.metrics,
        "response_length": sum(lengths) / len(lengths),
        "truncation_rate": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
        # contexts over the scorer's window (rows that cannot fit are skipped at start; the scorer refuses one)
        "scoring/truncated_frac": sum(c > limit for c in contexts) / len(contexts),
        "time/rollout": result.rollout_done - t0,
        "time/scoring": result.scoring_done - result.rollout_done,
        "time/learning": result.learning_done - result.scoring_done,
        "time/step": result.learning_done - t0,
        **marker_record(texts, lengths, match=cfg.markers.match),
    }


def utilization(roles: Roles, t0: float, t1: float) -> dict[str, float]:
    """util/<role>: the share of [t0, t1] the role's workers were busy, averaged over its workers."""
    counts = {"rollout": len(roles.rollout), "scoring": len(roles.scoring), "learner": len(roles.learners)}
    return {f"util/{role}": roles.busy.util(role, n, t0, t1) for role, n in counts.items()}


def finish_record(record: dict, sync_seconds: float, sync_bytes: int) -> dict:
    """What a step's record gets after the sync: the sync, the step's time and its throughput."""
    step_time = record["time/step"] + sync_seconds
    return {"time/sync": sync_seconds, "time/step": step_time, "sync_bytes": sync_bytes,
            "tokens_per_s": record["num_tokens"] / step_time}
