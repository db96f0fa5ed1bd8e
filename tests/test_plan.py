"""`opsd-ray plan`: shapes, arithmetic, the memory model against measured tensors, the CLI."""

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opsd_ray.cli import main as cli_main
from opsd_ray.config.recipes import Config, ConfigError, compose, load_train_config
from opsd_ray.models.shapes import TABLE, GiB, Shapes, find_shapes, shapes_from_config
from opsd_ray.tools.plan import LOSS_BUFFERS, Planner, main

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def planner(*overrides, gpus=8, gpu_mem=80.0, model="qwen3-8b", data="math-cot-20k") -> Planner:
    cfg = compose(Config, {"model": model, "data": data}, dict(o.split("=", 1) for o in overrides))
    return Planner(cfg, gpus, gpu_mem)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("hub_id, params", [
    ("Qwen/Qwen3-8B", 8_190_735_360),  # the Hub's safetensors parameter counts
    ("Qwen/Qwen3-4B", 4_022_468_096),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 7_615_616_512),
    ("builtin:smollm2-135m", 134_515_008),
])
def test_table_parameter_counts(hub_id, params):
    assert TABLE[hub_id].params() == params
    assert "built-in table" in TABLE[hub_id].source


def test_qwen3_8b_numbers_used_in_the_readme():
    s = TABLE["Qwen/Qwen3-8B"]
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab, s.tied) == \
        (36, 4096, 32, 8, 128, 12288, 151936, False)
    assert s.core_params() == 6_946_075_648  # "6.95B non-embedding" on the model card
    assert s.kv_bytes_per_token(2) == 2 * 36 * 8 * 128 * 2 == 147_456
    assert s.lora_params(64, set(ALL_LINEAR)) == 36 * 64 * (2 * 8192 + 2 * 5120 + 3 * 16384) == 174_587_904
    p = planner()
    assert p.wire_bytes_per_step() == (3 * 4096 * 2, 3 * 4096 * 2 * 32 * 1024)  # 0.75 GiB per step
    assert planner("scoring.wire_format=logits").wire_bytes_per_step()[0] == 3 * 151936 * 2
    assert (p.len_student, p.len_teacher, p.len_ref) == (2048 + 128 + 1024, 2048 + 4096 + 128 + 1024, 4096 + 128 + 1024)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "olmo3", "llama"])
def test_shapes_from_config_count_what_transformers_builds(arch):
    """Parameter counts from a config.json equal the parameters of the model transformers builds."""
    import transformers

    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=arch == "llama")
    config = {"qwen3": transformers.Qwen3Config, "qwen2": transformers.Qwen2Config,
              "olmo3": transformers.Olmo3Config, "llama": transformers.LlamaConfig}[arch](**kw)
    model = transformers.AutoModelForCausalLM.from_config(config)
    s = shapes_from_config(json.loads(config.to_json_string()), "test")
    assert s.params() == sum(p.numel() for p in model.parameters())
    assert s.kv_bytes_per_token(2) == 2 * 2 * (2 * s.head_dim) * 2  # K and V, 2 layers, 2 KV heads, bf16


def test_find_shapes_reads_config_json_on_disk(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
        "tie_word_embeddings": False}))
    for name in ("model.safetensors", "tokenizer.json"):  # a model folder; the plan reads config.json only
        (tmp_path / name).write_text("{}")
    cfg = load_train_config(["model=qwen3-8b", f"model.path={tmp_path}"])
    s = find_shapes(cfg.model)
    assert s.source == str(tmp_path / "config.json")
    assert s.params() == TABLE["Qwen/Qwen3-8B"].params()
    tiny = find_shapes(load_train_config(["model=tiny"]).model)  # the builder's config, no build
    assert (tiny.layers, tiny.hidden, tiny.vocab) == (2, 64, 151936) and "tiny builder" in tiny.source
    with pytest.raises(ConfigError, match="no shapes for model.path=org/unknown-model"):
        find_shapes(load_train_config(["model=qwen3-8b", "model.path=org/unknown-model"]).model)


# ----------------------------------------------------------------------------- the memory model, measured
class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive (CPU, exact)."""

    def __init__(self, keep=()):
        super().__init__()
        self.live = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in keep}  # parameters are not activations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                if st.data_ptr() not in self.seen:
                    self.seen.add(st.data_ptr())
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, st.data_ptr(), st.nbytes())
        return out

    def _free(self, ptr, n):
        self.live -= n
        self.seen.discard(ptr)


SMALL = Shapes(layers=1, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=384, vocab=1000, tied=False,
               qkv_bias=False, qk_norm=64, source="test")


def small_model(layers: int, checkpointing: bool = False, lora: bool = True):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=SMALL.vocab, hidden_size=SMALL.hidden,
                                      intermediate_size=SMALL.intermediate, num_hidden_layers=layers,
                                      num_attention_heads=SMALL.heads, num_key_value_heads=SMALL.kv_heads,
                                      head_dim=SMALL.head_dim, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"))
    return model


def small_planner() -> Planner:
    p = planner("model.lora.r=8")
    p.s = SMALL
    return p


def saved_after_forward(layers: int, checkpointing: bool, tokens=(2, 256)) -> int:
    model = small_model(layers, checkpointing).train()
    decoder = model.get_base_model().get_decoder()
    ids = torch.randint(0, SMALL.vocab, tokens)
    with LiveBytes(keep=[*model.parameters(), *model.buffers()]) as m:
        graph = decoder(input_ids=ids, attention_mask=torch.ones_like(ids))  # holds what backward needs
        assert graph.last_hidden_state.requires_grad
        return m.live


@pytest.mark.parametrize("checkpointing", [False, True])
def test_learner_activations_per_token_and_layer_match_measurement(checkpointing):
    """bf16 Qwen3 + LoRA (float32 adapters, as peft makes them): bytes kept for backward per layer."""
    n_tokens = 2 * 256
    per_layer = (saved_after_forward(4, checkpointing) - saved_after_forward(2, checkpointing)) / (2 * n_tokens)
    p = small_planner()
    model_per_layer = p.dt * SMALL.hidden if checkpointing else p.layer_activation_bytes()
    assert model_per_layer == pytest.approx(per_layer, rel=0.1), (model_per_layer, per_layer)


def test_scoring_pass_memory_matches_measurement():
    """No gradients and no KV cache (scoring.py passes use_cache=False): a transient per token only."""
    p = small_planner()
    peaks = {}
    for layers in (2, 4):
        model = small_model(layers, lora=False).eval()
        ids = torch.randint(0, SMALL.vocab, (6, 256))
        with torch.no_grad(), LiveBytes(keep=[*model.parameters(), *model.buffers()]) as m:
            model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        peaks[layers] = m.peak / ids.numel()
    assert peaks[4] == pytest.approx(peaks[2], rel=0.05)  # nothing accumulates layer by layer
    assert p.dt * (3 * SMALL.intermediate + 4 * SMALL.hidden) == pytest.approx(peaks[2], rel=0.1)


def test_fused_loss_holds_about_nine_chunk_by_vocab_buffers():
    from opsd_ray.objective.formulas import FrozenVariants, opsd_loss

    n, h, v, chunk = 256, 32, 4000, 64
    head = torch.randn(v, h, dtype=torch.bfloat16)
    student = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    frozen = [torch.randn(n, h, dtype=torch.bfloat16) for _ in range(3)]
    with LiveBytes(keep=[head, student, *frozen]) as m:
        loss, _ = opsd_loss(student, FrozenVariants(*frozen), mode="pmi", chunk_size=chunk, lm_head=head,
                            frozen_lm_head=head)
        loss.backward()
    buffers = m.peak / (chunk * v * 4)
    assert LOSS_BUFFERS - 1.5 <= buffers <= LOSS_BUFFERS, buffers


# ----------------------------------------------------------------------------- plans
def test_paper_recipe_fits_and_its_split_is_the_suggestion():
    p = planner()
    roles = [p.rollout(4, 1, 0.85), p.scoring(2), p.learner()]
    assert all(r.total <= r.budget for r in roles) and p.warnings(roles) == []
    split = p.suggest()
    cfg = p.cfg
    assert (split.rollout_workers, split.tp, split.scoring_workers, split.learners) == \
        (cfg.rollout.num_workers, cfg.rollout.tensor_parallel_size, cfg.scoring.num_workers, cfg.learner.num_workers)
    assert cfg.learner.num_workers == 2 and cfg.learner.gpus_per_worker == 1
    learner = {i.label.split(" (")[0]: i.nbytes for i in p.learner().items}
    assert learner["weights"] == 8_190_735_360 * 2 and learner["LoRA params + grads + AdamW"] == 174_587_904 * 16
    assert learner["fused loss"] == 9 * 1024 * 151936 * 4


def test_warnings_say_what_to_change():
    p = planner("learner.gradient_checkpointing=false")
    (w,) = p.warnings([p.learner()])
    assert "learner needs" in w and "learner.gradient_checkpointing=true" in w
    p = planner("scoring.micro_batch_size=8", "data.path=x", model="olmo-3-7b-think", data="dasd-10k", gpu_mem=40)
    (w,) = p.warnings([p.scoring(3)])
    assert "a scoring worker needs 41.0 GiB but a GPU has 40.0 GiB: set scoring.micro_batch_size=7" in w
    p = planner("rollout.num_workers=1", "rollout.gpu_memory_utilization=0.3")
    (w,) = p.warnings([p.rollout(1, 1, 0.3)])
    assert "raise rollout.gpu_memory_utilization to 0.40" in w
    assert planner(gpus=2).suggest() is None


def test_plan_cli_prints_the_plan(capsys):
    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8"]) == 0
    out = capsys.readouterr().out
    for text in ("8.19 B parameters", "shapes from: built-in table", "144 KiB/token", "0.75 GiB (logits would be 27.8 GiB)",
                 "suggested for 8 GPUs: rollout 4 x 1 GPU(s), scoring 2 x 1, learner 2 x 1", "no warnings"):
        assert text in out, text
    assert main(["model=qwen3-8b", "data=dasd-10k", "gpus=4", "gpu_mem=24"]) == 0  # no data.path needed
    out = capsys.readouterr().out
    assert "WARNING: the config asks for 8 GPUs but gpus=4" in out and "DOES NOT FIT" in out
    # rollout.n: the roles plan for every completion (8 prompts x 4 = 32 trajectories, as 32 prompts x 1)
    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8", "train.batch_size=8", "rollout.n=4"]) == 0
    out = capsys.readouterr().out
    assert "8 prompts x 4 completions = 32 trajectories x 1,024 tokens = 32,768 response tokens" in out
    assert "KV cache (8 seqs x 3,200)" in out  # 32 trajectories over 4 rollout workers


@pytest.mark.parametrize("args, message", [
    (["model=qwen3-8b"], "plan needs gpus=<n>"),
    (["model=qwen3-8b", "gpus=eight"], "gpus='eight' is not a number"),
    (["model=qwen3-8b", "gpus=0"], "gpus must be > 0"),
    (["model=qwen3-9b", "gpus=8"], "unknown model preset"),
    (["model=qwen3-8b", "gpus=8", "learner.lr=-1"], "learner.lr must be > 0"),
])
def test_plan_cli_bad_input_exits_2(args, message, capsys):
    with pytest.raises(ConfigError, match=message):
        main(args)
    assert cli_main(["plan", *args]) == 2
    assert message.split("<")[0] in capsys.readouterr().err


def test_gib_is_binary():
    assert GiB == 1024**3


def test_learner_groups_in_the_plan():
    """Two learners halve the learner's time; fsdp also divides its layers' memory by the group."""
    p = planner()
    one, two = p.seconds(4, 1, 2, learners=1), p.seconds(4, 1, 2, learners=2)
    assert two["learner"] == pytest.approx(one["learner"] / 2, rel=0.01) and two["rollout"] == one["rollout"]
    ddp, fsdp = planner("learner.strategy=ddp").learner(learners=2), planner("learner.strategy=fsdp").learner(learners=2)
    w = {r.items[0].label: r.items[0].nbytes for r in (ddp, fsdp)}
    assert w["weights"] == 8_190_735_360 * 2 and w["weights (fsdp)"] < 0.65 * w["weights"]
    assert fsdp.items[1].nbytes == ddp.items[1].nbytes / 2  # LoRA + AdamW sharded too


def test_step_estimate_follows_the_schedule():
    t = {"rollout": 10.0, "scoring": 6.0, "learner": 4.0}
    assert planner("train.schedule=phases").step_seconds(t) == 20.0
    assert planner("rollout.one_step_off=true").step_seconds(t) == 10.0
    assert planner().step_seconds(t) == pytest.approx(10.0 + 10.0 / 8)  # the last of 8 parts after the rollout


def test_the_plan_says_what_each_evaluation_schedule_costs(capsys):
    """The paper's recipe: 5 evaluations of 1,080 samples up to 32,768 tokens. Decode-bound on 4 rollout
    engines they take most of the run; an engine on each of the 8 GPUs after training halves that."""
    import re

    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8"]) == 0
    out = capsys.readouterr().out
    assert "evaluation 5 points (steps 0, 50, 100, 150, 200) x 1,080 samples" in out
    inline = re.search(r"inline .*: ([\d.]+) h each, ([\d.]+) h in all = (\d+)% of a ([\d.]+) h run  <- eval.schedule", out)
    end = re.search(r"end .*: ([\d.]+) h each, ([\d.]+) h in all = (\d+)% of a ([\d.]+) h run", out)
    assert inline and end, out
    each_inline, each_end = float(inline.group(1)), float(end.group(1))
    assert 0.5 <= each_inline <= 2.0  # the review's estimate: 1 to 1.5 h per evaluation on 4 rollout GPUs
    assert each_end == pytest.approx(each_inline / 2, rel=0.2)  # twice the engines, a larger share of each GPU
    assert int(inline.group(3)) > int(end.group(3)) > 50
    planner = Planner(load_train_config(["model=qwen3-8b", "data=math-cot-20k"]), 8, 80)
    from opsd_ray.tools.timemodel import eval_seconds

    one = eval_seconds(planner, 1, 0.9)
    assert one >= 32768 * planner.s.params() * 2 / planner.time.bandwidth()  # never faster than the longest sample alone
    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8", "eval.every=0"]) == 0
    assert "\nevaluation" not in capsys.readouterr().out  # no evaluation, no section


def test_the_time_model_says_where_the_hours_go_per_role_schedule_and_gpu(capsys, tmp_path):
    """Per-role seconds, the step under each schedule with its critical path, the run's hours, the stated
    assumptions; a faster memory shortens decode only; calibrate= swaps the efficiencies for measured ones."""
    import json
    import re

    from opsd_ray.tools.timemodel import GPUS, TimeModel, role_seconds, step_seconds

    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8", "gpu=h100"]) == 0
    out = capsys.readouterr().out
    assert "time     H100 SXM: 989 TFLOP/s bf16, 3.35 TB/s; efficiency (stated)" in out
    assert re.search(r"per step .*: rollout [\d.]+ s \(prefill [\d.]+, decode [\d.]+\), scoring [\d.]+ s, learner "
                     r"[\d.]+ s; critical path: rollout", out), out
    assert re.search(r"step: phases [\d.]+ s, streaming [\d.]+ s <-, one-step-off [\d.]+ s", out)
    assert "training: 200 steps x" in out and "assumptions: prefill and scoring are compute-bound" in out

    cfg = load_train_config(["model=qwen3-8b", "data=math-cot-20k"])
    h100, h200 = (Planner(cfg, 8, 80, TimeModel(GPUS[g])) for g in ("h100", "h200"))
    a, b = role_seconds(h100, 4, 1, 2, 2), role_seconds(h200, 4, 1, 2, 2)
    assert b["decode"] == pytest.approx(a["decode"] * 3.35 / 4.8) and b["scoring"] == a["scoring"]
    assert step_seconds(a, "phases", False, 8) == pytest.approx(a["rollout"] + a["scoring"] + a["learner"])
    assert step_seconds(a, "streaming", True, 8) == max(a["rollout"], a["scoring"], a["learner"])

    proof = tmp_path / "gpu-proof.json"
    proof.write_text(json.dumps({"efficiency": {"decode": 0.3, "learner": 0.2}}))
    slow = Planner(cfg, 8, 80, TimeModel(GPUS["h100"]).calibrated(proof))
    c = role_seconds(slow, 4, 1, 2, 2)
    assert c["decode"] == pytest.approx(2 * a["decode"]) and c["learner"] == pytest.approx(2 * a["learner"], rel=1e-3)
    assert main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8", f"calibrate={proof}"]) == 0
    assert f"efficiency (calibrated from {proof})" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="gpu='tpu' is not one of: h100, h200, a100, l40s"):
        main(["model=qwen3-8b", "data=math-cot-20k", "gpus=8", "gpu=tpu"])
