"""Offline engine benchmark: decode step latency, prefill latency, end-to-end throughput.

Every figure is written beside the floor measured on the same device in the same run (bytes
over copy bandwidth, FLOPs over matmul rate) and, where feasible, beside HF transformers on the
same shapes. ``kvfabric bench offline --model preset:llama-3.1-8b --out DIR`` on a GPU;
``kvfabric bench offline --out DIR`` on CPU runs the bundled SmolLM2 with smaller sizes.
Writes ``offline.json`` and ``offline.png``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bench.floors import measure_floors
from bench.report import environment, save_json, save_plot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine(args, **overrides):
    from engine import EngineConfig, LLMEngine

    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                       enforce_eager=args.enforce_eager, load_format=args.load_format, **overrides)
    return LLMEngine(cfg)


def _random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def decode_latency(engine, batch: int, context: int, steps: int, rng: random.Random) -> dict:
    from engine import SamplingParams

    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", _random_prompt(rng, context, vocab), params, stream=False)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(steps):
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    engine.abort_request(list(engine.scheduler.requests))
    while engine.has_work():
        engine.step()
    step_s = statistics.median(times[2:] if len(times) > 4 else times)
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def prefill_latency(engine, length: int, rng: random.Random, repeats: int = 3) -> dict:
    from engine import SamplingParams

    vocab = engine.model_config.vocab_size
    times = []
    for r in range(repeats):
        engine.add_request(f"p{length}-{r}", _random_prompt(rng, length, vocab),
                           SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        _sync(engine.device)
        t0 = time.perf_counter()
        while engine.has_work():
            engine.step()
        _sync(engine.device)
        times.append(time.perf_counter() - t0)
    return {"tokens": length, "ms": statistics.median(times) * 1e3}


def make_workload(num_requests: int, lo: int, hi: int, vocab: int, rng: random.Random) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs, input and output lengths uniform in [lo, hi]."""
    return [(_random_prompt(rng, rng.randint(lo, hi), vocab), rng.randint(lo, hi)) for _ in range(num_requests)]


def throughput(engine, workload: list[tuple[list[int], int]]) -> dict:
    from engine import SamplingParams

    for i, (prompt, n_out) in enumerate(workload):
        engine.add_request(f"t{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True),
                           stream=False)
    _sync(engine.device)
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    _sync(engine.device)
    dt = time.perf_counter() - t0
    total_out = sum(n for _, n in workload)
    return {"num_requests": len(workload), "output_tokens": total_out, "seconds": dt,
            "output_tokens_per_s": total_out / dt}


def hf_generate_throughput(model, workload: list[tuple[list[int], int]], device) -> dict:
    """HF ``generate`` on the same prompts, one request at a time (greedy, exact output lengths)."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt, n_out in workload:
            ids = torch.tensor([prompt], device=device)
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                           do_sample=False, pad_token_id=0)
    _sync(device)
    dt = time.perf_counter() - t0
    total_out = sum(n for _, n in workload)
    return {"num_requests": len(workload), "output_tokens": total_out, "seconds": dt,
            "output_tokens_per_s": total_out / dt, "mode": "sequential generate()"}


def hf_decode_latency(model_dir_or_model, batch: int, context: int, steps: int, device, dtype) -> dict | None:
    """HF transformers with its own KV cache on the same shapes (random prompts, greedy)."""
    try:
        model = model_dir_or_model
        ids = torch.randint(100, model.config.vocab_size - 100, (batch, context), device=device)
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[2:] if len(times) > 4 else times)
        return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
    except torch.cuda.OutOfMemoryError:
        return None


def hf_prefill_latency(model, length: int, device) -> dict:
    ids = torch.randint(100, model.config.vocab_size - 100, (1, length), device=device)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {"tokens": length, "ms": statistics.median(times) * 1e3}


def analytic_floors(mc, dtype_bytes: int, floors: dict, batch: int, context: int) -> dict:
    """Decode step floor: weights + this batch's KV read once; prefill: 2 * params * tokens FLOPs."""
    params = mc.num_parameters()
    kv_bytes = batch * context * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * dtype_bytes
    return {"decode_step_floor_ms": (params * dtype_bytes + kv_bytes) / floors["copy_bytes_per_s"] * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfabric bench offline", description=__doc__)
    p.add_argument("--model", default=None, help="model dir, or preset:NAME with random weights")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-fused-kernels", action="store_true",
                   help="the torch expressions instead of engine/kernels (the A/B of the fused kernels)")
    p.add_argument("--batches", default=None, help="comma list (default: GPU 1,8,32,128,256; CPU 1,4,16)")
    p.add_argument("--context", type=int, default=None, help="decode context (GPU 1024, CPU 256)")
    p.add_argument("--prefill", default=None, help="comma list (GPU 512,2048,8192; CPU 128,512)")
    p.add_argument("--num-requests", type=int, default=None)
    p.add_argument("--lengths", default=None, help="lo,hi for the throughput run")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                   help="leaves room for the HF comparison model on the same GPU")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-generate", action="store_true", help="also time HF generate() on the throughput workload")
    p.add_argument("--out", default="bench_results/offline")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    batches = [int(x) for x in (args.batches or ("1,8,32,128,256" if gpu else "1,4,16")).split(",")]
    context = args.context or (1024 if gpu else 256)
    prefills = [int(x) for x in (args.prefill or ("512,2048,8192" if gpu else "128,512")).split(",")]
    num_requests = args.num_requests or (256 if gpu else 16)
    lo, hi = (int(x) for x in (args.lengths or ("100,1024" if gpu else "32,128")).split(","))
    rng = random.Random(0)

    engine = _engine(args, max_num_batched_tokens=max(max(prefills), 2048), max_num_seqs=max(max(batches), 256),
                     gpu_memory_utilization=args.gpu_memory_utilization, fused_kernels=not args.no_fused_kernels)
    device, dtype = engine.device, engine.dtype
    floors = measure_floors(device, dtype)
    mc = engine.model_config
    report = {"settings": vars(args), "environment": environment(device), "model": mc.describe(),
              "floors": floors, "decode": [], "prefill": [], "throughput": None, "hf": {}}
    for b in batches:
        r = decode_latency(engine, b, context, args.steps, rng)
        r.update(analytic_floors(mc, dtype.itemsize, floors, b, context))
        r["ratio_to_floor"] = r["step_ms"] / r["decode_step_floor_ms"]
        report["decode"].append(r)
        print(f"decode batch {b:4d} ctx {context}: {r['step_ms']:.2f} ms/step ({r['tokens_per_s']:.0f} tok/s), "
              f"floor {r['decode_step_floor_ms']:.2f} ms")
    for n in prefills:
        r = prefill_latency(engine, n, rng)
        r["floor_ms"] = 2 * mc.num_parameters() * n / floors["matmul_flops_per_s"] * 1e3
        r["ratio_to_floor"] = r["ms"] / r["floor_ms"]
        report["prefill"].append(r)
        print(f"prefill {n:5d} tokens: {r['ms']:.1f} ms (floor {r['floor_ms']:.1f} ms)")
    workload = make_workload(num_requests, lo, hi, mc.vocab_size, rng)
    report["throughput"] = throughput(engine, workload)
    print(f"throughput: {report['throughput']['output_tokens_per_s']:.0f} output tok/s "
          f"({num_requests} requests, lengths {lo}-{hi})")

    if not args.no_hf:
        hf_source = (engine.model_path, engine.model_config, engine.dtype, engine.device)
        engine.shutdown()
        del engine  # free its KV cache and graphs: HF needs the memory
        import gc

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        hf = engine_as_hf(*hf_source)
        if hf is not None:
            report["hf"]["decode"] = [hf_decode_latency(hf, b, context, min(args.steps, 10), device, dtype)
                                      for b in batches[:2]]
            report["hf"]["prefill"] = [hf_prefill_latency(hf, n, device) for n in prefills]
            for r in report["hf"]["decode"]:
                if r:
                    print(f"HF decode batch {r['batch']}: {r['step_ms']:.2f} ms/step")
            for r in report["hf"]["prefill"]:
                print(f"HF prefill {r['tokens']}: {r['ms']:.1f} ms")
            if args.hf_generate:
                report["hf"]["throughput"] = hf_generate_throughput(hf, workload, device)
                print(f"HF generate throughput: {report['hf']['throughput']['output_tokens_per_s']:.0f} output tok/s")

    out = Path(args.out)
    save_json(out / "offline.json", report)
    _plot(report, out / "offline.png")
    print(f"wrote {out / 'offline.json'}")
    return 0


def engine_as_hf(path, model_config, dtype, device):
    """HF transformers on the same shapes: the same checkpoint, or the same preset with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        hf_config = dict(model_config.hf_config)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=dtype)
    return model.to(device).eval()


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    d = report["decode"]
    axes[0].plot([r["batch"] for r in d], [r["step_ms"] for r in d], "o-", label="kvfabric")
    axes[0].plot([r["batch"] for r in d], [r["decode_step_floor_ms"] for r in d], "k--", label="floor")
    hf = [r for r in report["hf"].get("decode", []) if r]
    if hf:
        axes[0].plot([r["batch"] for r in hf], [r["step_ms"] for r in hf], "s-", label="HF transformers")
    axes[0].set(xscale="log", yscale="log", xlabel="batch", ylabel="decode step (ms)", title="decode step latency")
    axes[0].legend()
    pf = report["prefill"]
    axes[1].plot([r["tokens"] for r in pf], [r["ms"] for r in pf], "o-", label="kvfabric")
    axes[1].plot([r["tokens"] for r in pf], [r["floor_ms"] for r in pf], "k--", label="floor")
    hfp = report["hf"].get("prefill", [])
    if hfp:
        axes[1].plot([r["tokens"] for r in hfp], [r["ms"] for r in hfp], "s-", label="HF transformers")
    axes[1].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms", title="prefill latency")
    axes[1].legend()
    save_plot(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
