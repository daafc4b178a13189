"""`python -m gpt2.checkpoint list|inspect|export DIR_OR_URL [...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from gpt2 import logs
from gpt2.checkpoint.lineage import Lineage, read_lineage
from gpt2.checkpoint.store import CheckpointStore, read_meta, resolve_checkpoint
from gpt2.checkpoint.weights import model_from_checkpoint
from gpt2.errors import Gpt2Error, exit_code
from gpt2.model import export_hf

log = logging.getLogger("gpt2.checkpoint")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2.checkpoint",
                                     description="List, inspect and export checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="complete checkpoints under a directory or URL")
    p_list.add_argument("url")
    p_inspect = sub.add_parser("inspect", help="step, tokens and config of one checkpoint (or the newest)")
    p_inspect.add_argument("url")
    p_export = sub.add_parser("export", help="write a checkpoint as a Hugging Face GPT-2 directory")
    p_export.add_argument("url")
    p_export.add_argument("out_dir")
    p_export.add_argument("--tokenizer-dir", default=None, help="copy encoder.json/vocab.bpe from here")
    args = parser.parse_args(argv)
    logs.setup()
    try:
        if args.command == "list":
            list_checkpoints(args.url)
        elif args.command == "inspect":
            url = resolve_checkpoint(args.url)
            meta = read_meta(url)
            config = meta.pop("config", {})
            print(f"checkpoint {url}")
            for k, v in meta.items():
                print(f"  {k}: {v}")
            print("config:")
            print(json.dumps(config, indent=2))
        else:
            model, _ = model_from_checkpoint(args.url, tokenizer_dir=args.tokenizer_dir)
            out = export_hf(model, args.out_dir, tokenizer_dir=args.tokenizer_dir)
            print(f"exported {args.url} to {out} (transformers.GPT2LMHeadModel.from_pretrained('{out}'))")
    except Gpt2Error as err:
        log.error("%s", err)
        sys.exit(exit_code(err))


def list_checkpoints(url: str) -> None:
    """The complete checkpoints, those of the current lineage first; then what was moved aside."""
    store = CheckpointStore(url)
    found, current = store.complete(), read_lineage(url)
    if current is not None:
        print(f"current {current.describe()}")
    if not found:
        print(f"no complete checkpoints under {url}")
    for c in found:
        other = current is not None and not current.owns(c.meta)
        print(f"{c.url}  step {c.step}  tokens {c.meta.get('tokens_seen', '?'):,}  "
              f"world {c.meta.get('world_size', '?')}  {c.meta.get('bytes', 0) / 1e6:.1f} MB  "
              f"lineage {Lineage.of(c.meta).id}" + ("  (not of the current lineage)" if other else ""))
    for moved in store.moved_aside():
        print(f"{moved}  moved aside ({moved.rsplit('.', 1)[-1].split('-')[0]})")


if __name__ == "__main__":
    main()
