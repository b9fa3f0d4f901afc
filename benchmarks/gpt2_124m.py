"""GPT-2 124M through the engine's own training code: tokens/s of `LocalTrainer.train_round` against a bare
torch loop on the same model and batch, measured in the same run, plus the cost of the site-round pieces
around training (snapshot of the weights, `DeltaCodec` encode to one float64 vector, decode of a sum).

Columns:
- engine: `worldlm_secure.train.LocalTrainer.train_round` (TrainConfig with local_steps=--steps,
  batch_size=--batch, default AdamW betas (0.9, 0.95), grad-norm clipping at 1.0, per-step LR schedule,
  `autocast_for(device)`: bf16 autocast on CUDA, fp32 elsewhere);
- bare: the minimal torch loop on the same model object: zero_grad, forward with labels, backward,
  clip_grad_norm_(1.0), AdamW step, inside the same `autocast_for(device)` so both do the same arithmetic.
  engine_vs_bare = engine tokens/s / bare tokens/s (1.0 = our loop costs nothing extra); engine_vs_bare_cpu is
  the same ratio from process CPU seconds, which other processes on a shared box disturb less than wall time.
The two are interleaved (--repeats blocks of --steps steps each, alternating which goes first, after --warmup
steps of each) so machine load hits both alike; figures are medians over blocks (tokens = batch * seq_len per
optimizer step).
- codec: the pieces of a site round outside training, on every parameter of the model (the largest possible
  shared group): snapshot (named_parameters cloned to CPU), encode (delta = params - server, then
  `DeltaCodec.encode` into concat(w_l * delta_l) ++ w as float64) and `decode_average`; GB/s counts the float64
  vector's bytes.
No federated round is run here: a full `Engine` world round with `model: {arch: gpt2, size: gpt2-124m}` trains
every site in turn and does not fit a 2-core box; the trainer and codec on the real 124M model are what it is
made of. CUDA: `--device cuda` (or auto on a GPU machine) runs the same code path with bf16 autocast.

Run: python benchmarks/gpt2_124m.py [--steps 2] [--batch 4] [--seq-len 256] [--repeats 4] [--device auto]
Writes benchmarks/results/gpt2_124m.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from worldlm_secure.aggregation import DeltaCodec
from worldlm_secure.model import ModelSpec, build_model, count_parameters
from worldlm_secure.train import LocalTrainer, TrainConfig, autocast_for, pick_device

RESULTS = Path(__file__).resolve().parent / "results" / "gpt2_124m.json"
GB = 1e9


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall time covers the work (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def bare_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sequences: torch.Tensor, steps: int, batch: int,
    device: torch.device, generator: torch.Generator,
) -> float:
    """The minimal training loop: same batch draw, loss, clipping and AdamW as the engine, nothing else."""
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        idx = torch.randint(0, sequences.shape[0], (batch,), generator=generator)
        ids = sequences[idx].to(device, non_blocking=True)
        with autocast_for(device):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return float(loss.item())


def timed(fn: Any, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, device work included. CPU seconds (all threads) are
    less sensitive to other processes competing for the cores than wall time is."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def codec_costs(model: torch.nn.Module, repeats: int) -> dict[str, Any]:
    """Snapshot, encode and decode of the whole model as one group, as a site round does them (best of repeats)."""
    names = [n for n, _ in model.named_parameters()]
    snap_s, enc_s, dec_s = [], [], []
    server = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters()}
    codec = DeltaCodec.for_tensors(server, names)
    weights = np.full(len(names), 0.5)
    vec = np.zeros(0)
    for _ in range(repeats):
        t0 = time.perf_counter()
        params = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters()}
        t1 = time.perf_counter()
        vec = codec.encode({n: params[n] - server[n] for n in names}, weights)
        t2 = time.perf_counter()
        codec.decode_average(vec)
        t3 = time.perf_counter()
        snap_s.append(t1 - t0)
        enc_s.append(t2 - t1)
        dec_s.append(t3 - t2)
        del params
    vec_bytes = int(vec.nbytes)
    return {
        "tensors": len(names),
        "vector_len": codec.length,
        "vector_bytes": vec_bytes,
        "snapshot_s": min(snap_s),
        "encode_s": min(enc_s),
        "encode_gb_s": vec_bytes / GB / min(enc_s),
        "decode_s": min(dec_s),
        "decode_gb_s": vec_bytes / GB / min(dec_s),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    load_before = os.getloadavg()
    spec = ModelSpec(arch="gpt2", size=args.size, max_seq_len=max(128, args.seq_len))
    model = build_model(spec)
    params = count_parameters(model)
    vocab = int(model.config.vocab_size)
    n_pos = int(getattr(model.config, "n_positions", args.seq_len))
    if args.seq_len > n_pos:
        raise SystemExit(f"--seq-len {args.seq_len}: the model has {n_pos} positions")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"model {args.size}: {params:,} parameters (vocab {vocab}, tied embeddings: {tied}); device {device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load_before}")

    # Benchmark input only (random token ids), not secret: a seeded generator keeps runs comparable.
    data_gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, vocab, (max(64, 4 * args.batch), args.seq_len), generator=data_gen)
    cfg = TrainConfig(local_steps=args.steps, batch_size=args.batch, warmup_steps=1, lr=3e-4)
    trainer = LocalTrainer(model, cfg, device, total_steps=(args.repeats + 1) * args.steps)
    eng_opt = trainer.make_optimizer()
    bare_opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), foreach=True)
    eng_gen = torch.Generator().manual_seed(1)
    bare_gen = torch.Generator().manual_seed(2)

    # Warm-up: allocator, optimizer state, thread pools; a one-step engine round and bare steps.
    warm_trainer = LocalTrainer(model, TrainConfig(local_steps=args.warmup, batch_size=args.batch), device, 1)
    t_warm = time.perf_counter()
    if args.warmup:
        warm_trainer.train_round(sequences, eng_opt, 0, eng_gen)
        bare_steps(model, bare_opt, sequences, args.warmup, args.batch, device, bare_gen)
    t_warm = time.perf_counter() - t_warm

    eng_s: list[float] = []
    bare_s: list[float] = []
    eng_cpu: list[float] = []
    bare_cpu: list[float] = []
    losses: list[float] = []
    for r in range(args.repeats):
        # alternate which goes first so a load change mid-run does not favour one column
        order = ("engine", "bare") if r % 2 == 0 else ("bare", "engine")
        for which in order:
            if which == "engine":
                wall, cpu = timed(lambda: losses.append(trainer.train_round(sequences, eng_opt, r * args.steps, eng_gen)), device)
                eng_s.append(wall)
                eng_cpu.append(cpu)
            else:
                wall, cpu = timed(lambda: bare_steps(model, bare_opt, sequences, args.steps, args.batch, device, bare_gen), device)
                bare_s.append(wall)
                bare_cpu.append(cpu)
        print(f"  block {r + 1}/{args.repeats}: engine {eng_s[-1]:.2f} s ({eng_cpu[-1]:.1f} CPU s), "
              f"bare {bare_s[-1]:.2f} s ({bare_cpu[-1]:.1f} CPU s) for {args.steps} steps, load {os.getloadavg()[0]:.2f}")

    tokens = args.steps * args.batch * args.seq_len
    tps_engine = tokens / statistics.median(eng_s)
    tps_bare = tokens / statistics.median(bare_s)
    codec = codec_costs(model, args.codec_repeats) if args.codec_repeats else None
    return {
        "model_size": args.size,
        "params": params,
        "vocab_size": vocab,
        "tied_embeddings": tied,
        "device": str(device),
        "autocast": "bf16" if device.type == "cuda" else "none (fp32)",
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "warmup_s": t_warm,
        "tokens_per_block": tokens,
        "engine_block_s": eng_s,
        "bare_block_s": bare_s,
        "tokens_per_s_engine": tps_engine,
        "tokens_per_s_bare": tps_bare,
        "engine_vs_bare": tps_engine / tps_bare,
        "engine_block_cpu_s": eng_cpu,
        "bare_block_cpu_s": bare_cpu,
        "cpu_s_per_token_engine": statistics.median(eng_cpu) / tokens,
        "cpu_s_per_token_bare": statistics.median(bare_cpu) / tokens,
        "engine_vs_bare_cpu": statistics.median(bare_cpu) / statistics.median(eng_cpu),
        "s_per_step_engine": statistics.median(eng_s) / args.steps,
        "approx_train_gflop_s": 6 * params * tps_engine / GB,  # 6 N FLOPs per token, attention not counted
        "mean_loss_engine": float(np.mean(losses)) if losses else None,
        "codec": codec,
        "federated_round": "not run: an Engine world round on 124M trains every site in turn; too heavy for 2 cores",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
    }


def render(res: dict[str, Any]) -> None:
    table = Table(title=f"GPT-2 {res['model_size']} ({res['params']:,} params) on {res['device']}, "
                        f"batch {res['batch']} x seq {res['seq_len']}, {res['threads']} threads")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("engine train_round, tokens/s", f"{res['tokens_per_s_engine']:.1f}")
    table.add_row("bare torch loop, tokens/s", f"{res['tokens_per_s_bare']:.1f}")
    table.add_row("engine / bare (wall tokens/s)", f"{res['engine_vs_bare']:.3f}")
    table.add_row("engine / bare (by CPU seconds)", f"{res['engine_vs_bare_cpu']:.3f}")
    table.add_row("s per optimizer step (engine)", f"{res['s_per_step_engine']:.2f}")
    table.add_row("approx. GFLOP/s (6N per token)", f"{res['approx_train_gflop_s']:.1f}")
    c = res["codec"]
    if c:
        table.add_row(f"snapshot {c['tensors']} tensors to CPU, s", f"{c['snapshot_s']:.3f}")
        table.add_row(f"DeltaCodec.encode -> {c['vector_bytes'] / GB:.2f} GB float64, s", f"{c['encode_s']:.3f}")
        table.add_row("  encode GB/s (float64 out)", f"{c['encode_gb_s']:.2f}")
        table.add_row("DeltaCodec.decode_average, s", f"{c['decode_s']:.3f}")
    table.add_row("load average before / after", f"{res['load_average_before'][0]:.2f} / {res['load_average_after'][0]:.2f}")
    table.add_row("peak RSS, GB", f"{res['peak_rss_gb']:.2f}")
    Console().print(table)
    print(f"federated round: {res['federated_round']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per timed block")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved engine/bare blocks")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop first")
    ap.add_argument("--codec-repeats", type=int, default=2, help="0 skips the codec measurement")
    ap.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--size", default="gpt2-124m", help=argparse.SUPPRESS)  # tiny: the smoke test
    args = ap.parse_args(argv)
    res = run(args)
    render(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
