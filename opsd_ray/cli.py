"""`opsd-ray` command line: train, eval, prepare-data, plan, report, doctor.

Arguments are `key=value` pairs: `model=<preset> data=<preset>` pick recipes, everything else is a
dotted override such as `objective.beta=2`. Configuration errors exit with code 2 and one message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from opsd_ray.config.recipes import ConfigError, RunStopped, known_presets, load_train_config, parse_overrides


def _train(args: list[str], show_config: bool, verbose: bool = False, pool=None) -> int:
    cfg = load_train_config([*args, "logging.verbose=true"] if verbose else args)
    if show_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from opsd_ray.run.driver import train  # heavy imports only after validation

    train(cfg, pool)
    return 0


def _prepare_data(args: list[str]) -> int:
    """Turn a source into a clean parquet file, with the same skipped-rows report as training; a sampled
    data set (data.sample) is drawn into its cache, where training reads it."""
    from opsd_ray.config.recipes import Config, compose, validate_train
    from opsd_ray.data.sources import load_examples, token_counter, tokenizer_id, write_parquet

    overrides = parse_overrides(args)
    out = overrides.pop("out", None)
    presets = {"model": overrides.pop("model", "smollm2-135m"), "data": overrides.pop("data", "gsm8k")}
    overrides.setdefault("data.limit", "null")
    cfg = compose(Config, presets, overrides)
    validate_train(cfg)
    if not out and not cfg.data.sample:
        raise ConfigError("prepare-data needs out=<file.parquet> (a data set with data.sample goes to its cache)")
    count_tokens = None
    if overrides.pop("count_tokens", "true") != "false":
        from opsd_ray.models.loading import load_tokenizer

        count_tokens = token_counter(load_tokenizer(cfg.model))
    examples, report = load_examples(cfg.data, count_tokens, seed=cfg.run.seed, tokenizer_id=tokenizer_id(cfg.model))
    print(report.summary())
    if out:
        out_path = Path(out)
        write_parquet(sorted(examples, key=lambda e: e.id), out_path)
        report.save(out_path.with_suffix(".report.json"))
        print(f"wrote {len(examples)} rows to {out_path} (report: {out_path.with_suffix('.report.json')})")
    return 0


def _plan(args: list[str]) -> int:
    from opsd_ray.tools.plan import main as plan_main

    return plan_main(args)


def _eval(args: list[str]) -> int:
    """Evaluate a model preset, with an adapter or without, on benchmarks (the loop of opsd_ray.run.evaluation,
    on one engine in this process)."""
    from datetime import datetime

    from opsd_ray.config.recipes import load_eval_config
    from opsd_ray.eval.benchmarks import load_benchmark
    from opsd_ray.eval.run import prompt_ids, read_adapter
    from opsd_ray.eval.summary import markdown_table
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.calls import LocalCalls
    from opsd_ray.run.evaluation import evaluate_to
    from opsd_ray.run.faults import Faults
    from opsd_ray.run.groups import RolloutGroup
    from opsd_ray.workers.engines import pick_engine
    from opsd_ray.workers.rollout import RolloutWorker

    ev = load_eval_config(args)
    model_cfg, served = ev.model, None
    if ev.adapter is not None:
        state, conf = read_adapter(ev.adapter)
        # the engine's LoRA slots must have the adapter's shape, whatever the preset says
        model_cfg.lora.r, model_cfg.lora.alpha = int(conf["r"]), int(conf["lora_alpha"])
        model_cfg.lora.target_modules = sorted(conf["target_modules"])
        served = (0, state, conf)
    import torch

    engine = pick_engine(ev.engine, model_cfg.lora.r, on_gpu=torch.cuda.is_available())
    out = Path(ev.out or f"runs/eval-{model_cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    tok = load_tokenizer(model_cfg)
    longest = max(len(prompt_ids(tok, model_cfg, p, ev.enable_thinking))
                  for b in ev.benchmarks for p in load_benchmark(b, ev.limit))
    print(f"eval: model={model_cfg.name} adapter={ev.adapter} engine={engine} benchmarks={list(ev.benchmarks)} "
          f"n_samples={ev.n_samples} max_new_tokens={ev.max_new_tokens}", flush=True)
    worker = RolloutWorker(model_cfg, ev.rollout, engine, ev.seed, None, longest + ev.max_new_tokens + 8)
    engines = RolloutGroup([worker], LocalCalls(), Faults(0))
    summary = evaluate_to(engines, ev, out, served, adapter=ev.adapter, engine=engine, model_path=str(model_cfg.path))
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'generations.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}", flush=True)
    return 0


def _report(args: list[str]) -> int:
    from opsd_ray.tools.report import main as report_main

    return report_main(args)


def _doctor(args: list[str]) -> int:
    from opsd_ray.tools.doctor import main as doctor_main

    return doctor_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with OPSD (pmi or standard mode)")
    train.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--verbose", action="store_true",
                       help="engine and worker logs on the console too (they always go to runs/<name>/logs/)")
    sub.add_parser("eval", help="evaluate a model or adapter on math benchmarks")
    sub.add_parser("prepare-data", help="validate a data source and write a clean parquet file")
    sub.add_parser("plan", help="print the memory and GPU plan of a setting")
    sub.add_parser("report", help="plots and a markdown summary of one or more runs")
    sub.add_parser("presets", help="list the model and data presets")
    sub.add_parser("doctor", help="installed versions, devices, flash-attn and vLLM, and whether they agree")
    for p in sub.choices.values():
        p.add_argument("overrides", nargs="*", help="model=<preset> data=<preset> section.key=value ...")
    return parser


def main(argv: list[str] | None = None, pool=None) -> int:
    """The command line; a Python caller may pass a `WorkerPool` (opsd_ray.run.pool) to `train`."""
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "train":
            return _train(ns.overrides, ns.show_config, ns.verbose, pool)
        if ns.command == "prepare-data":
            return _prepare_data(ns.overrides)
        if ns.command == "plan":
            return _plan(ns.overrides)
        if ns.command == "eval":
            return _eval(ns.overrides)
        if ns.command == "report":
            return _report(ns.overrides)
        if ns.command == "doctor":
            return _doctor(ns.overrides)
        print("model presets:", ", ".join(known_presets("model")))
        print("data presets: ", ", ".join(known_presets("data")))
        return 0
    except ConfigError as e:
        print(f"opsd-ray {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"opsd-ray {ns.command}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
