"""t2i's MMDiT and SD3 pipeline against diffusers on identical configs and weights, in one process.

For each config, both models hold the same random weights (t2i's state dict converted by ``t2i.io.sd3``), and
every measurement alternates t2i and diffusers runs so that load from other processes hits both alike. Reported
is the fastest of the repetitions (interference from other processes only ever adds time, so the minimum is the
most stable estimate on a shared machine) and the ratio diffusers / t2i (> 1: t2i is faster), for:

- forward (no grad), forward + backward, and a training step (flow-matching loss, backward, AdamW step: t2i's
  trainer's fused AdamW against torch's default one, as each side's training code builds it);
- 4- and 28-step sampling with CFG 4.5: ``SD3Pipeline`` vs ``StableDiffusion3Pipeline`` with precomputed
  embeddings, Euler, shift 3, latents out;

in fp32 and, where this CPU multiplies bf16 natively, under bf16 autocast (``--precisions``), for t2i's plain path
and its opt-in fused path (``MMDiT.set_fast_path``).

    python benchmarks/vs_diffusers.py                  # both configs
    python benchmarks/vs_diffusers.py --configs bench --reps 5
    python benchmarks/vs_diffusers.py --configs bench --compile   # adds both models under torch.compile

``--compile`` adds a third path: t2i's fast path under ``torch.compile`` against diffusers' model under
``torch.compile``, forward and training step, and each side's one-time compile cost (its first calls less steady
ones). A t2i training run compiles its model with ``run.compile: true``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, replace

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from side_by_side import alternate

from t2i.io.sd3 import transformer_official_to_diffusers
from t2i.models.mmdit import PRESETS, MMDiT, MMDiTConfig, count_parameters
from t2i.nn.precision import timed_precisions
from t2i.pipelines.sd3 import SD3Pipeline, SD3Preset
from t2i.train.config import OptimConfig
from t2i.train.optim import build_optimizer


@dataclass(frozen=True)
class Case:
    name: str
    cfg: MMDiTConfig
    batch: int
    latent: int  # latent side (pixels / 8)
    tokens: int = 77


CASES = {
    # the small benchmark MMDiT (PRESETS['bench']): 4 layers, 9.08M parameters, batch 4, 32x32x16 latents, 77 tokens
    "bench": Case("bench", PRESETS["bench"], batch=4, latent=32),
    # a larger MMDiT-X: 6 blocks of width 384, QK-norm, dual attention in blocks 0-1
    "larger": Case(
        "larger",
        replace(
            PRESETS["bench"], depth=6, num_heads=6, context_dim=384, pooled_dim=256, x_block_self_attn_layers=(0, 1)
        ),
        batch=2,
        latent=32,
    ),
}


def diffusers_model(model: MMDiT) -> SD3Transformer2DModel:
    c = model.cfg
    ref = SD3Transformer2DModel(
        sample_size=c.pos_embed_base_size * c.patch_size, patch_size=c.patch_size, in_channels=c.in_channels,
        num_layers=c.depth, attention_head_dim=c.head_dim, num_attention_heads=c.heads,
        joint_attention_dim=c.context_dim, caption_projection_dim=c.hidden_size, pooled_projection_dim=c.pooled_dim,
        out_channels=c.out_ch, pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=c.x_block_self_attn_layers, qk_norm="rms_norm" if c.qk_norm else None,
    )  # fmt: skip
    ref.load_state_dict(transformer_official_to_diffusers(model.state_dict()), strict=True)
    return ref


def timed_pair(f_t2i, f_dif, reps: int) -> tuple[float, float]:
    """Fastest seconds of each, runs interleaved (after one warm-up each)."""
    a, b = alternate(f_t2i, f_dif, reps)
    return min(a), min(b)


def run_case(case: Case, amp: bool, fast: bool, reps: int, sample_reps: int, steps_list,
             compiled: bool = False) -> list[tuple]:  # fmt: skip
    """Rows ``(measurement, t2i seconds, diffusers seconds)``. ``compiled``: both models under ``torch.compile``
    (t2i on its fast path), forward and training step only, plus a row with each side's compile time."""
    torch.manual_seed(0)
    model = MMDiT(case.cfg)
    with torch.no_grad():  # non-trivial weights (a fresh model is adaLN-zero: output 0)
        for name, p in model.named_parameters():
            if "adaLN" in name or name.startswith("final_layer.linear"):
                p.normal_(0, 0.02)
    ref = diffusers_model(model)
    model.set_fast_path(fast or compiled)
    ours, theirs = (torch.compile(model), torch.compile(ref)) if compiled else (model, ref)
    first_calls = {}
    c, B, S = case.cfg, case.batch, case.latent
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, c.in_channels, S, S, generator=g)
    ctx = torch.randn(B, case.tokens, c.context_dim, generator=g)
    pooled = torch.randn(B, c.pooled_dim, generator=g)
    t = torch.rand(B, generator=g) * 1000
    amp_ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    rows = []

    def first_call_timed(f, key):  # the first call compiles (when compiled); its time, less a steady call's, is
        def g():  # the compile cost
            t0 = time.perf_counter()
            f()
            if key not in first_calls:
                first_calls[key] = time.perf_counter() - t0
            return None

        return g

    def fwd(m, dif):
        def f():
            with torch.no_grad(), amp_ctx():
                return m(x, ctx, pooled, t).sample if dif else m(x, t, ctx, pooled)

        return first_call_timed(f, ("forward", dif))

    rows.append(("forward", *timed_pair(fwd(ours, False), fwd(theirs, True), reps)))

    def fwd_bwd(m, dif):
        def f():
            with amp_ctx():
                out = ref(x, ctx, pooled, t).sample if dif else m(x, t, ctx, pooled)
            out.float().square().mean().backward()

        return f

    if not compiled:
        rows.append(("forward+backward", *timed_pair(fwd_bwd(model, False), fwd_bwd(ref, True), reps)))

    eps = torch.randn(x.shape, generator=g)
    sig = torch.sigmoid(torch.randn(B, generator=g))  # logit-normal sigma
    x_t = (1 - sig[:, None, None, None]) * x + sig[:, None, None, None] * eps
    # each side with its own training code's optimizer: t2i's trainer builds the fused AdamW kernel
    # (t2i.train.optim), diffusers' training scripts torch's default AdamW
    opt_t2i = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.01))
    opt_dif = torch.optim.AdamW(ref.parameters(), lr=1e-5)

    def train_step(m, opt, dif):
        def f():
            with amp_ctx():
                v = m(x_t, ctx, pooled, sig * 1000).sample if dif else m(x_t, sig * 1000, ctx, pooled)
            loss = (v.float() - (eps - x)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return first_call_timed(f, ("train", dif))

    step_times = timed_pair(train_step(ours, opt_t2i, False), train_step(theirs, opt_dif, True), reps)
    rows.append(("train step (AdamW)", *step_times))
    if compiled:  # first calls (forward, then the training step's forward + backward graphs) less steady calls
        cost = [first_calls[("forward", d)] + first_calls[("train", d)] - rows[0][1 + d] - step_times[d]
                for d in (False, True)]  # fmt: skip
        rows.append(("compile (s, once)", *cost))
        return rows

    neg_ctx, neg_pooled = torch.zeros_like(ctx), torch.zeros_like(pooled)
    pipe = StableDiffusion3Pipeline(
        transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    px = S * 8
    for steps in steps_list:
        ours = SD3Pipeline(model, preset=SD3Preset(steps=steps, guidance=4.5, sampler="euler"))

        def s_t2i(ours=ours):
            with amp_ctx():
                ours(context=ctx, pooled=pooled, negative_context=neg_ctx, negative_pooled=neg_pooled,
                     seeds=list(range(B)), height=px, width=px, output="latent")  # fmt: skip

        def s_dif(steps=steps):
            with amp_ctx():
                pipe(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ctx,
                     negative_pooled_prompt_embeds=neg_pooled, latents=x, height=px, width=px,
                     num_inference_steps=steps, guidance_scale=4.5, output_type="latent")  # fmt: skip

        rows.append((f"sample {steps} steps, CFG", *timed_pair(s_t2i, s_dif, sample_reps)))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of forward/backward/train step")
    ap.add_argument("--sample-reps", type=int, default=2, help="timed repetitions of each sampling run")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 28])
    ap.add_argument("--no-fast", action="store_true", help="skip the fused-path rows")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="add rows with both models under torch.compile (t2i's fast path; forward and training step)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                    help="default: fp32, and bf16 where this CPU multiplies bf16 natively")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fastest repetition; ratio diffusers / t2i")
    header = (
        f"{'config':<8} {'dtype':<5} {'t2i path':<8} {'measurement':<22} {'t2i':>10} {'diffusers':>10} {'ratio':>6}"
    )
    for name in args.configs:
        case = CASES[name]
        n = count_parameters(MMDiT(case.cfg, device="meta"))
        print(f"\n{name}: {n / 1e6:.2f}M parameters, batch {case.batch}, latent {case.latent}x{case.latent}, "
              f"{case.tokens} text tokens")  # fmt: skip
        print(header)
        print("-" * len(header))
        for amp in [p == "bf16" for p in args.precisions or timed_precisions()]:
            paths = ["plain"] + ([] if args.no_fast else ["fast"]) + (["compiled"] if args.compile else [])
            for path in paths:
                rows = run_case(case, amp, path == "fast", args.reps, args.sample_reps, args.steps, path == "compiled")
                for what, a, b in rows:
                    unit = (a * 1e3, b * 1e3, "ms") if a < 2 and not what.startswith("compile") else (a, b, "s ")
                    print(f"{name:<8} {'bf16' if amp else 'fp32':<5} {path:<8} {what:<22} "
                          f"{unit[0]:>8.1f}{unit[2]} {unit[1]:>8.1f}{unit[2]} {b / a:>6.2f}")  # fmt: skip
                sys.stdout.flush()


if __name__ == "__main__":
    main()
