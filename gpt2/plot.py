"""`python -m gpt2.plot RUN_OR_LOG_DIR [--out run.png]`: a run at a glance, as build-nanogpt's notebook draws it.

Two panels: train loss (from `steps.jsonl`) and val loss (from the TensorBoard events) with OpenAI
GPT-2's val loss on FineWeb-Edu; HellaSwag acc_norm with GPT-2's and GPT-3's levels for the model's
size. The reference levels are drawn when the run is one of the GPT-2 sizes. Works while the run
is in progress. Needs matplotlib: `pip install 'gpt2[plot]'`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from gpt2 import logs
from gpt2.config import PRESETS
from gpt2.errors import PlotError, exit_code
from gpt2.metrics import ATTEMPTS_FILE, STEPS_FILE, current_steps, read_attempts

log = logging.getLogger("gpt2.plot")  # also when run as __main__

# (GPT-2 val loss on the FineWeb-Edu val shard, GPT-2 HellaSwag acc_norm, GPT-3 HellaSwag acc_norm),
# as build-nanogpt's notebook draws them; None where no level is known.
LEVELS: dict[str, tuple[float | None, float, float]] = {
    "gpt2": (3.2924, 0.294463, 0.337),
    "gpt2-medium": (None, 0.375224, 0.436),
    "gpt2-large": (None, 0.431986, 0.510),
    "gpt2-xl": (None, 0.488946, 0.547),
}



def find_log_dir(path: Path) -> Path:
    """The TensorBoard directory holding steps.jsonl: `path` itself or a `tensorboard/` below it."""
    for candidate in (path, path / "tensorboard"):
        if (candidate / "steps.jsonl").is_file():
            return candidate
    found = sorted(p.parent for p in path.rglob("steps.jsonl"))
    if len(found) == 1:
        return found[0]
    if found:
        raise PlotError(f"{path} holds several runs ({', '.join(map(str, found))}); name one of them")
    raise PlotError(f"no steps.jsonl under {path}: give a run's TensorBoard directory (logging.dir)")


def read_run(log_dir: Path) -> dict:
    """Train loss per step, val loss and HellaSwag series, and the GPT-2 size of the run (or None)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ledger = log_dir / ATTEMPTS_FILE
    attempts = read_attempts(ledger.read_text()) if ledger.is_file() else []
    steps = current_steps((log_dir / STEPS_FILE).read_text(), attempts)  # the current lineage's
    train = {step: r["loss"] for step, r in steps.items()}
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in tags["scalars"] else []

    size = None
    if "config/text_summary" in tags.get("tensors", []):
        text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
        model = (yaml.safe_load(text.split("```")[1]) or {}).get("model", {})
        size = next((name for name, dims in PRESETS.items()
                     if all(model.get(k) == v for k, v in dims.items())), None)
    return {"train": sorted(train.items()), "val": series("val/loss"),
            "hellaswag": series("eval/hellaswag_acc_norm"), "size": size}


def plot(run: dict, out: Path, title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'gpt2[plot]'") from None
    levels = LEVELS.get(run["size"] or "", (None, None, None))
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6))
    if run["train"]:
        left.plot(*zip(*run["train"]), label="train loss", linewidth=0.8, alpha=0.8)
    if run["val"]:
        left.plot(*zip(*run["val"]), label="val loss", marker="o", markersize=3)
    if levels[0] is not None:
        left.axhline(levels[0], color="r", linestyle="--", label=f"OpenAI GPT-2 ({run['size']}) val loss")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    if run["hellaswag"]:
        right.plot(*zip(*run["hellaswag"]), label="HellaSwag acc_norm", marker="o", markersize=3)
    if levels[1] is not None:
        right.axhline(levels[1], color="r", linestyle="--", label=f"OpenAI GPT-2 ({run['size']})")
        right.axhline(levels[2], color="g", linestyle="--", label=f"OpenAI GPT-3 ({run['size']})")
    right.set(xlabel="step", ylabel="accuracy", title="HellaSwag")
    if run["hellaswag"] or levels[1] is not None:
        right.legend()
    else:
        right.text(0.5, 0.5, "no HellaSwag results (yet)", ha="center", va="center", transform=right.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.plot", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run's TensorBoard directory (logging.dir), or a run directory above it")
    p.add_argument("--out", default="run.png", help="where to write the PNG (default run.png)")
    args = p.parse_args(argv)
    logs.setup()
    try:
        log_dir = find_log_dir(Path(args.path))
        run = read_run(log_dir)
        out = plot(run, Path(args.out), str(log_dir))
    except PlotError as err:
        log.error("%s", err)
        return exit_code(err)
    last = run["train"][-1] if run["train"] else None
    print(f"wrote {out}" + (f" (step {last[0]}, train loss {last[1]:.4f})" if last else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
