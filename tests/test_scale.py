"""Scale out and overlap on real local Ray with the tiny model: a learner group (gloo), the streaming
schedule against phase by phase, one-step-off rollout, elastic resume, a learner on a second node."""

import json
import math
import time

import pytest
import torch

from opsd_ray.config.recipes import load_train_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def cfg_of(tmp_path, small_data, *extra):
    return load_train_config(["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}",
                              "run.name=r", "rollout.engine=hf", "train.batch_size=8", "learner.micro_batch_size=2",
                              "rollout.max_new_tokens=8", "learner.lr=1e-2", "train.diagnostics_every=2",
                              "checkpoint.every=0", *extra])


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- the learner group
def parts_of(cfg, n_parts=4):
    """Real trajectories' prompts with random responses, and their frozen variants, in parts."""
    from opsd_ray.data.prompts import build_prompt_ids
    from opsd_ray.data.sources import load_examples
    from opsd_ray.models.loading import load_model, load_tokenizer
    from opsd_ray.workers.scoring import VARIANTS, ScoringItem, score

    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data)
    g = torch.Generator().manual_seed(0)
    items = [ScoringItem(build_prompt_ids(tok, e.question, e.reference, cfg.model, cfg.prompt),
                         torch.randint(0, 150_000, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist())
             for e in examples[: 2 * n_parts]]
    model = load_model(cfg.model)
    parts = [items[i : i + 2] for i in range(0, len(items), 2)]
    return [(p, score(model, p, variants=VARIANTS)) for p in parts]


@pytest.fixture
def learner_actors(local_ray, pool):
    """`start(cfg)`: three learner processes built from `cfg`, one alone and two in a group (gloo), held as a
    run holds its learners: they come warm from the pool (reset, as a run's are: the group is left and
    formed again) and go back to it after the test, for the next."""
    import os

    from omegaconf import OmegaConf

    from opsd_ray.run.cluster import resources_of, role_requests, start_actors
    from opsd_ray.run.pool import worker_key
    from opsd_ray.workers.learner import Learner

    held = {}  # group size -> (its key in the pool, actors, placement group)

    def start(cfg):
        for n, args in {1: [(cfg, 1, 0, 1)], 2: [(cfg, 1, 0, 2), (cfg, 1, 1, 2)]}.items():
            (request,) = [r for r in role_requests(OmegaConf.merge(cfg, {"learner": {"num_workers": n}}))
                          if r.role == "learner"]
            key = worker_key("learner", Learner, request, -1, os.cpu_count())  # as Groups.start keys a run's
            warm = pool.claim({"learner": key}, resources_of([request]), ray.cluster_resources()).get("learner")
            actors, pg, ready = start_actors(request, Learner, -1, args, warm)
            ray.get(ready)
            held[n] = (key, actors, pg)
        single, group = held[1][1], held[2][1]
        address, port = ray.get(group[0].group_address.remote())
        ray.get([learner.join_group.remote(address, port) for learner in group])
        return single, group

    yield start
    for key, actors, pg in held.values():
        if not pool.park(key, actors, pg):
            for a in actors:
                ray.kill(a)
            ray.util.remove_placement_group(pg)


def everyone(learners, method, *args, num_returns=1):
    """A learner method on every member (a collective under fsdp): rank 0's result."""
    refs = [getattr(a, method).options(num_returns=num_returns).remote(*args) for a in learners]
    return ray.get([r[-1] if num_returns > 1 else r for r in refs])[0]


def group_step(learners, parts):
    """One step of a group of learner actors (gloo); rank r takes a contiguous range of parts.
    Returns every rank's metrics, rank 0's adapter after the step and the group's checkpoint files."""
    from opsd_ray.workers.scoring import split_evenly

    for learner, share in zip(learners, split_evenly(parts, len(learners)), strict=True):
        for items, frozen in share:
            learner.accumulate.remote(items, [0] * len(items), True, frozen)
    tokens = sum(f.num_tokens for _, f in parts)
    metrics = ray.get([learner.step.remote(tokens) for learner in learners])
    return metrics, everyone(learners, "adapter_state", num_returns=2), everyone(learners, "checkpoint_files")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_learners_make_the_same_update_as_one(learner_actors, tmp_path, small_data, strategy):
    """Also: the group's checkpoint resumes the single learner, and the single learner's resumes the group
    (the same actors: a load replaces the state of their own step whole)."""
    cfg = cfg_of(tmp_path, small_data, f"learner.strategy={strategy}")
    parts = parts_of(cfg)
    single, group = learner_actors(cfg)
    files_init = ray.get(single[0].checkpoint_files.remote())  # the adapter as initialised (B = 0)
    (one,), state_one, _ = group_step(single, parts)
    two, state_two, files_two = group_step(group, parts)
    for k in ("loss", "jsd", "grad_norm", "num_tokens", "cos_total_ref", "kl_target_base", "wire_bytes_per_token"):
        assert two[0][k] == pytest.approx(one[k], rel=1e-6), k
    drop = ("start", "end")
    assert {k: v for k, v in two[0].items() if k not in drop} == {k: v for k, v in two[1].items() if k not in drop}
    assert set(state_two) == set(state_one)
    for k, v in state_one.items():
        # Two partial gradients summed differ from one sum in the last bits; Adam's first step, about
        # lr * sign(g), amplifies that for the few near-zero gradients (8e-7 seen; a step moves 1e-2).
        torch.testing.assert_close(state_two[k], v, rtol=1e-5, atol=1e-5 * cfg.learner.lr / 1e-2)
    assert any((v != 0).any() for k, v in state_one.items() if "lora_B" in k)  # it learned

    # checkpoints move between a group and a single learner: the group goes back to the start, the
    # single learner takes the group's step, and the group takes it back from the single learner
    ray.get([a.load_checkpoint_files.remote(files_init) for a in group])
    start = everyone(group, "adapter_state", num_returns=2)
    assert all((v == 0).all() for k, v in start.items() if "lora_B" in k)
    assert ray.get(single[0].load_checkpoint_files.remote(files_two)) == 1
    back = ray.get(single[0].adapter_state.options(num_returns=2).remote()[1])
    ray.get([a.load_checkpoint_files.remote(ray.get(single[0].checkpoint_files.remote())) for a in group])
    again = everyone(group, "adapter_state", num_returns=2)
    for k, v in state_two.items():
        assert torch.equal(back[k], v) and torch.equal(again[k], v), k


# ----------------------------------------------------------------------------- streaming = phases
def test_streaming_makes_the_update_phase_by_phase_makes(local_ray, tmp_path, small_data, pool):
    """The same actors run one step streaming and, from the same state, one step phase by phase; the
    same workers in this process (Groups.in_process, one learner) make the same update too."""
    from opsd_ray.data.sources import PromptSampler, load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.driver import step_once
    from opsd_ray.run.groups import Groups
    from opsd_ray.workers.engines import adapter_config

    # deterministic: each worker decodes its share one trajectory at a time, so its first micro-batch
    # is whole halfway through its rollout (a batched worker returns its share at once)
    cfg = cfg_of(tmp_path, small_data, "rollout.num_workers=2", "scoring.num_workers=2", "learner.num_workers=2",
                 "rollout.deterministic=true")
    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data)
    conf = adapter_config(cfg)
    groups = Groups.start(cfg, "hf", pool=pool)
    try:
        groups.sync(conf)
        start = groups.learner.whole("checkpoint_files")
        results = {}
        for schedule in ("streaming", "phases"):
            groups.learner.load_checkpoint(start)
            cfg.train.schedule = schedule
            sampler = PromptSampler(examples, cfg.train.batch_size)
            t0 = time.time()
            record = step_once(cfg, groups, sampler, tok, 1, 0)
            state = ray.get(groups.learner.whole("adapter_state", returns=2)[1])
            first_learning = min(a for spans in groups.learner.busy.intervals.values() for a, _ in spans if a >= t0)
            results[schedule] = (record, state, first_learning - t0)
    finally:
        groups.shutdown(pool)
    (rec_s, state_s, learn_s), (rec_p, state_p, _) = results["streaming"], results["phases"]
    assert rec_s["loss"] == rec_p["loss"] and rec_s["grad_norm"] == rec_p["grad_norm"]
    for k, v in state_p.items():
        assert torch.equal(state_s[k], v), k  # bit for bit
    assert learn_s < rec_s["time/rollout"]  # streaming: a learner started before the last trajectory came

    cfg.learner.num_workers = 1
    local = Groups.in_process(cfg, "hf")
    local.sync(conf)
    rec_l = step_once(cfg, local, PromptSampler(examples, cfg.train.batch_size), tok, 1, 0)
    # one learner's sums, not two partial ones, on other thread counts: the same to float32 rounding (the
    # adapters are not compared: Adam's first step, about lr * sign(g), flips for near-zero gradients)
    for k in ("loss", "jsd", "grad_norm", "kl_target_base", "num_tokens", "response_length"):
        assert rec_l[k] == pytest.approx(rec_s[k], rel=1e-5), k


# ----------------------------------------------------------------------------- one-step-off, elastic resume
def test_one_step_off_rollout_trains_one_version_behind(local_ray, tmp_path, small_data, pool):
    from opsd_ray.run.driver import train

    folder = train(cfg_of(tmp_path, small_data, "rollout.one_step_off=true", "train.steps=3"), pool)
    records = read_metrics(folder)
    assert [r["staleness"] for r in records] == [0, 1, 1]
    assert [r["adapter_version_used"] for r in records] == [0, 0, 1]
    assert [r["adapter_version"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and 0 <= r["util/rollout"] <= 1 and 0 < r["util/learner"] <= 1
    assert (folder / "final" / "adapter_model.safetensors").exists()


def test_resume_with_more_scoring_workers_continues_exactly(local_ray, tmp_path, small_data, pool):
    """A checkpoint written with S = 1, resumed with S = 2 (and 2 rollout workers): the same run, bit for bit
    in the rollout's deterministic mode (2 workers decode the batch in halves)."""
    from opsd_ray.run.driver import train

    same = ("train.steps=4", "checkpoint.every=2", "rollout.deterministic=true")
    full = train(cfg_of(tmp_path, small_data, "run.name=full", *same), pool)
    split = train(cfg_of(tmp_path, small_data, "run.name=split", *same, "scoring.num_workers=2", "rollout.num_workers=2",
                         f"checkpoint.resume={full / 'checkpoints' / 'step_2'}"), pool)
    a, b = read_metrics(full), read_metrics(split)
    assert [r["step"] for r in b] == [3, 4]
    for ra, rb in zip(a[2:], b, strict=True):
        for k in ("loss", "jsd", "grad_norm", "response_length", "kl_target_base", "num_tokens"):
            assert rb[k] == ra[k], (ra["step"], k)
    for k, v in adapter(full).items():
        assert torch.equal(adapter(split)[k], v), k


def test_an_fsdp_group_trains_checkpoints_and_a_single_learner_resumes(local_ray, tmp_path, small_data, pool):
    from opsd_ray.run.driver import train

    folder = train(cfg_of(tmp_path, small_data, "learner.num_workers=2", "learner.strategy=fsdp", "train.steps=2",
                          "checkpoint.every=2"), pool)
    resumed = train(cfg_of(tmp_path, small_data, "train.steps=3", "checkpoint.every=3"), pool)  # one ddp learner
    records = read_metrics(resumed)
    assert resumed == folder and [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[2]["adapter_version"] == 3


# ----------------------------------------------------------------------------- several completions per prompt
def test_a_prompts_completions_are_drawn_with_their_own_seeds_and_all_learnt(tmp_path, small_data):
    """rollout.n = 2 on the in-process groups: each prompt's 2 completions come next to each other with
    seeds of their own, a micro-batch holds one prompt's completions (scored in one shared row), and the
    step learns every completion's tokens."""
    from opsd_ray.data.sources import PromptSampler, load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.driver import diagnostics_step, launch, step_record
    from opsd_ray.run.groups import Groups
    from opsd_ray.run.schedule import run_step
    from opsd_ray.workers.engines import adapter_config

    cfg = cfg_of(tmp_path, small_data, "train.batch_size=2", "rollout.n=2", "rollout.ignore_eos=true",
                 "objective.mode=pmi")
    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data)
    groups = Groups.in_process(cfg, "hf")
    groups.sync(adapter_config(cfg))
    gen = launch(cfg, groups, PromptSampler(examples, cfg.train.batch_size), tok, 1)
    ids, seeds = [r[0] for r in gen.requests], [r[2] for r in gen.requests]
    assert ids[0] == ids[1] != ids[2] == ids[3] and len(set(seeds)) == 4
    assert gen.prompts[0] == gen.prompts[1] and gen.prompts[1] != gen.prompts[2]
    t0 = time.time()
    result = run_step(cfg, groups, gen, ("teacher", "ref", "base"), diagnostics_step(cfg, 1))
    responses = [t.response_ids for t in result.trajectories]
    assert len(responses) == 4 and responses[0] != responses[1] and responses[2] != responses[3]
    record = step_record(cfg, tok, gen, result, 0, t0, ("teacher", "ref", "base"))
    assert record["num_tokens"] == 4 * cfg.rollout.max_new_tokens and math.isfinite(record["loss"])
