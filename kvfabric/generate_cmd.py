"""``kvfabric generate "prompt"``: offline generation on the local engine."""

from __future__ import annotations

import argparse
import time


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text offline (no servers)")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("--model", default=None, help="HF-format model directory (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")


def run(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    t0 = time.perf_counter()
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    for prompt, out in zip(args.prompts, outs):
        print(f"=== {prompt!r}\n{out.outputs[0].text}\n[{out.outputs[0].finish_reason}]")
    print(f"--- {len(outs)} request(s), {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s)")
    return 0
