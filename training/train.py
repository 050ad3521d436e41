"""Train a small BlockFFN with the paper's CLS-aware objectives on one CPU core.

    python -m training.train --out models/blockffn-tiny-trained      # the shipped recipe, 800 steps

Loss = LM + λ_AL · L_AL + λ_CS · L_CS (SPEC.md §6; each term the mean over layers) + this repo's
anti-collapse hinges (revive experts that stop firing, push down always-on experts beyond
--allowed-always per layer; not in the paper), with λ_CS steered per layer towards --target-tls,
all ramped in linearly over --sparsity-ramp-steps from --sparsity-start-step (0 by default); or
the plain LM loss with --no-sparsity-losses (the baseline). training/README.md says what each
part does and which runs led to it (issue 12: routing, not pruning). The run stops after --steps optimizer
steps, or when --minutes of training time are spent; the learning-rate schedule follows
whichever of the two was given. The output folder is a complete checkpoint in the official
MiniCPM/BlockFFN format (config.json, model.safetensors, tokenizer files), plus
train_log.jsonl (one line per logged step), train_args.json and, unless --no-eval, eval.json
(held-out loss, TLS, CLS-L measured on the saved checkpoint by `training.evaluate`).
A tqdm bar on stderr shows progress and the time left (about 20-25 min on one core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from training import data as data_mod
from training.losses import (
    AdaptiveFactor,
    LayerCSController,
    activation_locality_loss,
    chunk_sparsification_loss,
    expert_rate_hinge_loss,
)
from training.model import TrainableBlockFFN
from vllm_blockffn.serving.config import BlockFFNSpec
from vllm_blockffn.tools.tiny import TinyOptions, save_weights, tiny_config, train_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--minutes", type=float, default=None, help="training-time budget; the learning-rate "
                   "schedule then follows time. With --steps it is only a cap")
    p.add_argument("--steps", type=int, default=None, help="number of optimizer steps (default 800 when "
                   "--minutes is not given; the learning-rate schedule then follows steps)")
    p.add_argument("--no-sparsity-losses", action="store_true", help="baseline: LM loss only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    # model
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=48, help="48: BlockFFN-Small's count (E·d_e = 1008 ≈ 4H)")
    p.add_argument("--expert-size", type=int, default=21)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the saved weights")
    # data / optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    # CLS-aware objectives
    p.add_argument("--lambda-al", type=float, default=2e-3, help="activation locality loss weight")
    p.add_argument("--alpha", type=float, default=100.0, help="sigmoid steepness of the AL loss")
    p.add_argument("--lambda-cs", type=float, default=0.7, help="chunk sparsification loss weight (initial "
                   "value with --cs-adaptive). Default 0.7 = 14x the paper's initial 5e-2: in runs this short "
                   "L_CS only falls, so the adaptive factor never grows, and its 4x cap (0.2) stops at TLS 74%% "
                   "(training/README.md)")
    p.add_argument("--cs-chunk", type=int, default=64, help="chunk length L of the CS loss")
    p.add_argument("--cs-adaptive", action=argparse.BooleanOptionalAction, default=False,
                   help="adaptive λ_CS factor (grows while L_CS rises, at most --cs-max-ratio ×)")
    p.add_argument("--cs-stable-steps", type=int, default=300)
    p.add_argument("--cs-window", type=int, default=50)
    p.add_argument("--cs-max-ratio", type=float, default=4.0)
    p.add_argument("--sparsity-start-step", type=int, default=0, help="LM-only warm-up: the AL and CS losses "
                   "are off before this step (0: on from the start, as in the paper; the hinges prevent the collapse "
                   "that made the earlier recipes warm up for 250 steps, see README)")
    p.add_argument("--sparsity-ramp-steps", type=int, default=200, help="then grow λ_AL and λ_CS linearly from 0 "
                   "over this many steps")
    # anti-collapse terms (this repo's, not the paper's; training/README.md)
    p.add_argument("--lambda-revive", type=float, default=1.0, help="weight of the hinge that pulls up the top "
                   "pre-activations of experts active on < --min-rate of the batch (0 = off)")
    p.add_argument("--min-rate", type=float, default=0.01)
    p.add_argument("--lambda-suppress", type=float, default=1.0, help="weight of the hinge that pushes down the "
                   "weakest positive pre-activations of experts active on > --max-rate of the batch (0 = off)")
    p.add_argument("--max-rate", type=float, default=0.85, help="below the 90%% bound of the held-out check, "
                   "as batch rates are noisy; flagged experts are pushed down to this rate − 0.1")
    p.add_argument("--allowed-always", type=int, default=3, help="per layer, this many of the most used experts "
                   "are exempt from the suppress hinge (shared experts; issue 12 allows up to 10%% of E)")
    p.add_argument("--target-tls", type=float, nargs="+", default=[0.82], help="per-layer λ_CS multipliers (after "
                   "the ramp) steered so that each layer's batch TLS approaches this value (one value, or one per "
                   "layer; 0 = off)")
    p.add_argument("--cs-gain", type=float, default=0.15, help="step size of the per-layer λ_CS controller")
    p.add_argument("--cs-mult-range", type=float, nargs=2, default=(0.25, 8.0), metavar=("LO", "HI"),
                   help="bounds of the per-layer λ_CS multipliers")
    p.add_argument("--hinge-ramp", action=argparse.BooleanOptionalAction, default=True,
                   help="ramp the hinges in with λ_AL and λ_CS (--no-hinge-ramp: full weight at once)")
    p.add_argument("--router-only-aux", action=argparse.BooleanOptionalAction, default=False,
                   help="the auxiliary losses train only the routers (their gradient stops at router_proj's input)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bar with a time estimate (stderr)")
    # snapshots: a baseline run can hand its state at --sparsity-start-step to a sparse run
    p.add_argument("--snapshot-at", type=int, default=None, help="save model/optimizer/sampler state at this step")
    p.add_argument("--snapshot", default=None, help="path of the snapshot file (--snapshot-at / --resume)")
    p.add_argument("--resume", default=None, help="continue from a snapshot (same settings otherwise)")
    # logging / evaluation
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the periodic eval")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    p.add_argument("--eval-max-windows", type=int, default=None, help="cap the final evaluation's windows")
    args = p.parse_args(argv)
    if args.steps is None and args.minutes is None:
        args.steps = 800
    if (args.snapshot_at is not None or args.resume) and not args.snapshot and not args.resume:
        p.error("--snapshot-at needs --snapshot PATH")
    if args.seq_len % args.cs_chunk:
        p.error(f"--seq-len {args.seq_len} must be a multiple of --cs-chunk {args.cs_chunk}")
    return args


def build_config(args, vocab: int) -> dict:
    opts = TinyOptions(attention="vanilla", layout="block", norm="rms", dtype=args.dtype,
                       hidden_size=args.hidden_size, num_layers=args.layers, num_experts=args.experts,
                       expert_size=args.expert_size, vocab_size=vocab)
    return tiny_config(opts, vocab)


def lr_at(args, step: int, progress: float) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith("router_norm") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def batch_sparsity(zs: list[torch.Tensor]) -> dict[str, float | list[int]]:
    """TLS, CLS-8, CLS-64 of a training batch (mean over layers) and `dyn`, the mean number of
    experts per layer active on between 1% and 90% of the batch's tokens (0 = static routing), and
    per layer the experts active on < 1% (`rare`) and > 90% (`always`) of them."""
    out = {"tls": 0.0, "cls8": 0.0, "cls64": 0.0, "dyn": 0.0}
    low, high = [], []
    for z in zs:
        active = z > 0
        B, T, E = active.shape
        out["tls"] += 1 - active.float().mean().item()
        for chunk in (8, 64):
            n = T // chunk
            union = active[:, : n * chunk].reshape(B, n, chunk, E).any(2)
            out[f"cls{chunk}"] += 1 - union.float().mean().item() if n else float("nan")
        rate = active.float().mean((0, 1))
        out["dyn"] += ((rate >= 0.01) & (rate <= 0.9)).sum().item()
        low.append(int((rate < 0.01).sum()))
        high.append(int((rate > 0.9).sum()))
    return {**{k: v / len(zs) for k, v in out.items()}, "rare": low, "always": high}


@torch.no_grad()
def layer_tls(zs: list[torch.Tensor]) -> list[float]:
    """Batch TLS of each layer (the per-layer λ_CS controller's input)."""
    return [1 - (z > 0).float().mean().item() for z in zs]


@torch.no_grad()
def quick_eval(model: TrainableBlockFFN, windows: torch.Tensor) -> float:
    model.eval()
    logits, _ = model(windows[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    model.train()
    return loss


def save_checkpoint(out: str, model: TrainableBlockFFN, cfg: dict, dtype: torch.dtype) -> None:
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f, indent=2)
    save_weights(out, model.official_tensors(dtype), "safetensors", 1)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    sparse = not args.no_sparsity_losses
    t0 = time.time()

    corpus = data_mod.load_corpus(args.heldout_fraction, seed=args.seed)
    vocab = train_tokenizer(args.out, args.vocab_size, texts=corpus.train)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    train_ids, train_docs = data_mod.encode_stream(tokenizer, corpus.train)
    held_ids, _ = data_mod.encode_stream(tokenizer, corpus.heldout)
    T = args.seq_len
    n_eval = min(args.eval_windows, (held_ids.numel() - 1) // (T + 1))
    eval_windows = held_ids[: n_eval * (T + 1)].view(n_eval, T + 1)
    print(f"corpus: {len(corpus.train)} train docs / {train_ids.numel()} tokens, {len(corpus.heldout)} held-out "
          f"docs / {held_ids.numel()} tokens (fingerprint {corpus.fingerprint}); vocab {vocab}; "
          f"setup {time.time() - t0:.1f}s", flush=True)

    cfg = build_config(args, vocab)
    spec = BlockFFNSpec.from_config(cfg)
    model = TrainableBlockFFN(spec)
    model.init_weights(args.seed)
    model.set_router_only_aux(args.router_only_aux)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters; H={spec.hidden_size} L={spec.num_hidden_layers} "
          f"E={spec.num_experts} d_e={spec.expert_size} heads={spec.num_attention_heads}/"
          f"{spec.num_key_value_heads}x{spec.head_dim}; sparsity losses {'ON' if sparse else 'OFF'}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sampler = data_mod.BatchSampler(train_ids, train_docs, T, args.batch_size, args.seed)
    cs_factor = AdaptiveFactor(args.lambda_cs, args.cs_stable_steps, args.cs_window, args.cs_max_ratio)
    lambda_cs = args.lambda_cs
    controller = None if not any(args.target_tls) else LayerCSController(spec.num_hidden_layers, args.target_tls,
                                                                         args.cs_gain, *args.cs_mult_range)

    with open(os.path.join(args.out, "train_args.json"), "w") as f:
        json.dump({**vars(args), "corpus_fingerprint": corpus.fingerprint, "corpus_source": corpus.source,
                   "train_tokens": train_ids.numel(), "heldout_tokens": held_ids.numel(),
                   "python": sys.version.split()[0], "torch": torch.__version__}, f, indent=2)
    log = open(os.path.join(args.out, "train_log.jsonl"), "w")
    budget = None if args.minutes is None else args.minutes * 60
    start = time.time()
    step = 0
    last = {}
    if args.resume:
        snap = torch.load(args.resume, weights_only=False)
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["opt"])
        sampler.gen.set_state(snap["sampler"])
        step, start = snap["step"], start - snap["elapsed"]
        print(f"resumed from {args.resume} at step {step} ({snap['elapsed'] / 60:.1f} min of training)", flush=True)
        log.write(json.dumps({"resumed_from": os.path.abspath(args.resume), "step": step,
                              "elapsed_s": snap["elapsed"]}) + "\n")
    from tqdm import tqdm

    total = args.steps if args.steps is not None else None
    bar = tqdm(total=total, initial=step, unit="step", desc="train", file=sys.stderr, disable=not args.progress,
               dynamic_ncols=True, mininterval=5.0)
    while True:
        elapsed = time.time() - start
        if args.snapshot_at is not None and step == args.snapshot_at and not args.resume:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sampler": sampler.gen.get_state(),
                        "step": step, "elapsed": elapsed}, args.snapshot)
            bar.write(f"snapshot at step {step} -> {args.snapshot}")
        if (args.steps is not None and step >= args.steps) or (budget is not None and elapsed >= budget):
            break
        progress = step / args.steps if args.steps is not None else elapsed / budget
        lr = lr_at(args, step, progress)
        for g in opt.param_groups:
            g["lr"] = lr

        x, y, same_doc = sampler.next()
        logits, zs = model(x)
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        sparse_now = sparse and step >= args.sparsity_start_step
        ramp = 1.0
        if sparse_now and args.sparsity_ramp_steps > 0:
            ramp = min(1.0, (step - args.sparsity_start_step + 1) / args.sparsity_ramp_steps)
        if sparse_now:
            al = torch.stack([activation_locality_loss(z, same_doc, args.alpha) for z in zs]).mean()
            cs_layers = torch.stack([chunk_sparsification_loss(z, args.cs_chunk) for z in zs])
            cs = cs_layers.mean()
            if controller is not None:
                cs_weighted = (cs_layers * cs_layers.new_tensor(controller.multipliers)).mean()
            else:
                cs_weighted = cs
            loss = lm + ramp * (args.lambda_al * al + lambda_cs * cs_weighted)
            if args.lambda_revive > 0 or args.lambda_suppress > 0:
                hinges = [expert_rate_hinge_loss(z, args.min_rate, args.max_rate,
                                                 target_max_rate=args.max_rate - 0.1,
                                                 allowed_always=args.allowed_always) for z in zs]
                revive = torch.stack([h[0] for h in hinges]).mean()
                suppress = torch.stack([h[1] for h in hinges]).mean()
                hinge_w = ramp if args.hinge_ramp else 1.0
                loss = loss + hinge_w * (args.lambda_revive * revive + args.lambda_suppress * suppress)
        else:
            loss = lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}")
        opt.step()

        if sparse_now and controller is not None and ramp >= 1.0:  # not during the ramp: it would overshoot
            controller.update(layer_tls(zs))
        if sparse_now and args.cs_adaptive:
            lambda_cs = cs_factor.step(cs.item(), step - args.sparsity_start_step)
        if step % args.log_every == 0 or (args.steps is not None and step == args.steps - 1):
            if not sparse_now:
                with torch.no_grad():
                    al = torch.stack([activation_locality_loss(z, same_doc, args.alpha) for z in zs]).mean()
                    cs = torch.stack([chunk_sparsification_loss(z, args.cs_chunk) for z in zs]).mean()
            last = {"step": step, "time_s": round(time.time() - start, 1), "lr": lr, "loss": loss.item(),
                    "lm": lm.item(), "al": al.item(), "cs": cs.item(),
                    "lambda_al": args.lambda_al * ramp if sparse_now else 0.0,
                    "lambda_cs": lambda_cs * ramp if sparse_now else 0.0,
                    "grad_norm": float(gnorm), **batch_sparsity(zs)}
            if sparse_now and (args.lambda_revive > 0 or args.lambda_suppress > 0):
                last["revive"], last["suppress"] = revive.item(), suppress.item()
            if controller is not None:
                last["cs_mult"] = [round(m, 3) for m in controller.multipliers]
            if step % args.eval_every == 0:
                last["heldout_lm"] = quick_eval(model, eval_windows)
            log.write(json.dumps(last) + "\n")
            log.flush()
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
        step += 1
        bar.update(1)
    bar.close()

    train_time = time.time() - start
    final_quick = quick_eval(model, eval_windows)
    print(f"trained {step} steps in {train_time / 60:.1f} min; held-out LM loss (quick, {n_eval} windows) "
          f"{final_quick:.4f}", flush=True)
    log.write(json.dumps({"done": True, "steps": step, "train_time_s": round(train_time, 1),
                          "tokens": step * args.batch_size * T, "heldout_lm_quick": final_quick}) + "\n")
    log.close()
    save_checkpoint(args.out, model, cfg, DTYPES[args.dtype])
    summary = {"steps": step, "train_time_s": train_time, "tokens_seen": step * args.batch_size * T,
               "last": last, "heldout_lm_quick": final_quick}
    if not args.no_eval:
        from training.evaluate import evaluate

        result = evaluate(args.out, seq_len=T, heldout_fraction=args.heldout_fraction, seed=args.seed,
                          max_windows=args.eval_max_windows)
        result["training"] = summary
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps({k: result[k] for k in ("heldout_loss", "tls", "cls")}, indent=1), flush=True)
        summary["eval"] = result
    return summary


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
