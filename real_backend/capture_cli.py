"""``moesim-capture``: record router traces from a local Hugging Face transformers MoE model.

    moesim-capture --model PATH --prompts FILE -o OUT.parquet [--max-new-tokens N]
                   [--predict lookahead] [--device cpu|cuda] [--dtype bfloat16|float32] [--ignore-eos]
                   [--force]

Prompts: a text file with one prompt per non-blank line, or a ``.jsonl``/``.ndjson`` file of
objects with a ``prompt`` field. Model and tokenizer load from PATH only (``local_files_only``:
nothing is downloaded). Each prompt runs alone: prefill, then greedy decoding of up to N tokens
(stopping at an end-of-sequence token unless ``--ignore-eos``). The trace (``workloads.trace``
schema) is written atomically to OUT; see ``real_backend.capture`` for what is recorded. OUT is
never the prompts file nor a file in the model directory, and an existing OUT is replaced only
with ``--force`` (both checked before anything loads).

Bad input (a missing path, a model that is not a supported MoE, an unknown option value) prints one
line ``moesim-capture: error: ...`` on stderr, exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from workloads.io import FORCE_HELP, check_outputs
from workloads.validation import ConfigError
from .cli_util import OneLineParser as _Parser, run_cli

PROG = "moesim-capture"




def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Record router traces from a local Hugging Face transformers "
                "MoE model (see real_backend.capture).")
    p.add_argument("--model", required=True, metavar="PATH", help="local model directory (config, weights, tokenizer)")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="text file (one prompt per line) or .jsonl with a 'prompt' field")
    p.add_argument("-o", "--output", required=True, metavar="OUT.parquet", help="trace file to write")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens generated per prompt (default 32; 0 = prefill only)")
    p.add_argument("--predict", choices=("lookahead",), default=None,
                   help="also record predicted_experts: the next MoE layer's router on this layer's state")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-new-tokens tokens (do not stop at end-of-sequence)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)
    return p


def _run(args: argparse.Namespace) -> int:
    check_outputs([("-o", args.output)], [("--model", args.model), ("--prompts", args.prompts)], args.force)
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} is invalid; must be >= 0")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"{exc.name} is not installed; moesim-capture needs the capture extra "
                          f"(pip install -e '.[capture]')") from None
    from . import capture as cap

    prompts = cap.read_prompts(args.prompts)
    cap.load_config(args.model)
    out = Path(args.output)
    device = cap.resolve_device(args.device)
    dtype = cap.resolve_dtype(args.dtype, device)
    token_ids = cap.tokenize(cap.load_tokenizer(args.model), prompts)
    model = cap.load_model(args.model, device, dtype)

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(token_ids), desc=PROG, unit="prompt", file=sys.stderr)
    try:
        result = cap.capture(
            model, token_ids, max_new_tokens=args.max_new_tokens, predict=args.predict,
            stop_at_eos=not args.ignore_eos,
            source=cap.describe_source(args.model, dtype, device, args.max_new_tokens, args.predict),
            progress=(lambda done, total: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    result.write(out)
    df, meta = result.frame, result.meta
    decode = int((df["phase"] == "decode").sum()) // len(meta.moe_layers)
    prefill = sum(result.prompt_lens)
    print(f"{PROG}: wrote {out}: {len(df)} rows, {len(token_ids)} requests, {prefill} prefill + "
          f"{decode} decode positions x {len(meta.moe_layers)} MoE layers, model {meta.model}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()

    def body() -> int:
        args = parser.parse_args(argv)
        return _run(args)

    return run_cli(PROG, body)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
