"""sapo-export: a run's Lightning checkpoint as a save_pretrained folder that plain transformers loads.

    sapo-export runs/micro/default/qwen2-micro-1m/sapo/seed0/checkpoints/last.ckpt
    sapo-export runs/.../checkpoints/last.ckpt --out exports/qwen2-sapo-seed0 --force

The folder (default: `export/` in the run folder) holds the trained policy and its tokenizer, as
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)` read
them, and sapo_export.json (which checkpoint, which step). `sapo-eval checkpoint=<folder>` scores
it exactly as `sapo-eval checkpoint=<the .ckpt>` does. Written to a temporary folder beside it,
then renamed into place: never half a folder.

The model is rebuilt from the run's config.yaml (two folders above the checkpoint) without
weights that matter, and the checkpoint's policy weights are loaded into it, every one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sapo_bench.checkpoints import LAST, checkpoint_problem
from sapo_bench.io import atomic_folder, atomic_write_json

EXAMPLE = "runs/micro/default/qwen2-micro-1m/sapo/seed0/checkpoints/last.ckpt"


def run_config(checkpoint: str | Path) -> DictConfig | None:
    """The resolved config of the run a checkpoint belongs to (<run_dir>/checkpoints/x.ckpt), if there."""
    path = Path(checkpoint).parent.parent / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def load_policy_weights(model: torch.nn.Module, checkpoint: str | Path) -> dict:
    """Load a sapo-train checkpoint's policy weights into `model` (all of them, strictly); returns
    the checkpoint's own record (rollout step, collapse state)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict({k[len("policy."):]: v for k, v in state["state_dict"].items() if k.startswith("policy.")})
    return state.get("sapo_bench", {})


def check_checkpoint(checkpoint: str | Path) -> Path:
    """The checkpoint as a Path, or an error that says what is wrong with it and what is expected."""
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, not a sapo-train checkpoint file (e.g. {EXAMPLE}); "
                         "a save_pretrained folder already loads with transformers, and a sharded (DeepSpeed) "
                         "checkpoint needs its zero_to_fp32.py first")
    if not path.is_file():
        hint = (f"; that run's checkpoints folder holds {', '.join(sorted(p.name for p in path.parent.iterdir()))}"
                if path.parent.is_dir() else "")
        raise FileNotFoundError(f"checkpoint {path} not found (a run's checkpoint is <run_dir>/checkpoints/{LAST}, "
                                f"e.g. {EXAMPLE}){hint}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} cannot be read: {problem}")
    return path


def export(checkpoint: str | Path, out: str | Path | None = None, *, replace: bool = False) -> Path:
    """Write `checkpoint`'s policy and tokenizer to `out` (default <run_dir>/export) with save_pretrained."""
    from sapo_bench.models import load_policy

    ckpt = check_checkpoint(checkpoint)
    cfg = run_config(ckpt)
    if cfg is None:
        raise FileNotFoundError(f"{ckpt.parent.parent / 'config.yaml'} not found: sapo-export reads the model of "
                                f"the run a checkpoint belongs to from there (a run's checkpoint is "
                                f"<run_dir>/checkpoints/{LAST})")
    out = Path(out) if out is not None else ckpt.parent.parent / "export"
    if out.exists() and not replace:
        raise FileExistsError(f"{out} exists: give another --out, or --force to replace it")
    model, tokenizer = load_policy(cfg.model, world_dir=cfg.data.get("root"))
    record = load_policy_weights(model, ckpt)
    with atomic_folder(out, replace=replace) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "sapo_export.json", {
            "checkpoint": str(ckpt.resolve()), "model": cfg.model.name, "algo": cfg.algo.name, "seed": cfg.seed,
            "rollout_step": record.get("rollout_step"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sapo-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help=f"a sapo-train checkpoint, e.g. {EXAMPLE}")
    parser.add_argument("--out", help="the folder to write (default: export/ in the run folder)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    a = parser.parse_args(argv)
    try:
        out = export(a.checkpoint, a.out, replace=a.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"sapo-export: {e}") from None
    print(json.dumps({"out": str(out), **json.loads((out / "sapo_export.json").read_text())}))


if __name__ == "__main__":
    main()
