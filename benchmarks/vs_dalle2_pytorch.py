"""t2i's unCLIP Unet and prior against DALLE2-pytorch's on matching configs: forward, training step, sampling.

    make bench-dalle2                      # builds .venv-dalle2 (dalle2-pytorch 1.15.6 beside torch 2.13), runs this
    .venv/bin/python benchmarks/vs_dalle2_pytorch.py --sample-steps 50 --repeats 3 --device cpu

Both run in this one process (t2i's venv), alternating repetition by repetition as benchmarks/vs_diffusers.py
does, so load from other processes meets both alike. DALLE2-pytorch lives in its own venv, ``.venv-dalle2``,
because it pins torchvision, which t2i does not need; its site-packages is appended to this process's path after
checking that every package the two venvs share has the same version in both (torch included), so DALLE2-pytorch
runs here exactly as in its own venv.

Matching configs (the issue's): Unet dim 64, dim_mults (1, 2, 4), 2 ResNet blocks per level, 8 heads x 32, 64x64,
batch 4, conditioned on a 512-d image embedding and 77 x 512 text encodings (DALLE2-pytorch: ``cond_on_image_embeds``
and ``cond_on_text_encodings``; t2i: ``image_embed_dim`` and ``text_embed_dim``), eps prediction, cosine schedule,
1000 training steps; prior dim 512, depth 6, 8 heads x 64, batch 32, text encodings of 77 tokens, x0 prediction.
Other architecture details follow each library's defaults (they differ: e.g. DALLE2-pytorch's cross-embed
input layer and multi-query attention); parameter counts are printed so the comparison can be judged.

Measured: forward (no grad, eval), training step (loss from clean data with noising, backward, AdamW step), and
sampling (DDIM with classifier-free guidance: decoder scale 3, prior scale 2; DALLE2-pytorch runs cond and uncond
as two forward passes, t2i as one batched pass), in fp32 and, where this CPU multiplies bf16 natively, under bf16
autocast (``--precisions`` picks); median and fastest of ``--repeats`` after one warm-up each. Ratios are
DALLE2-pytorch time / t2i time (> 1: t2i is faster).

torchvision note: PyPI's torchvision wheels link CUDA torch libraries (libc10_cuda.so), so their compiled ops do not
load beside the CPU torch build, and torchvision 0.28's ``import`` then fails on two unguarded fake-kernel
registrations (``torchvision::nms``, ``torchvision::qnms``). This script defines those two operator schemas
(no kernels) before importing, which is all the import needs; neither DALLE2-pytorch's Unet nor its prior calls
any torchvision op.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from contextlib import nullcontext, redirect_stderr
from pathlib import Path

import torch
from side_by_side import alternate

from t2i.nn.precision import timed_precisions

ROOT = Path(__file__).resolve().parents[1]
B_UNET, SIZE, B_PRIOR, D, L = 4, 64, 32, 512, 77


def inputs(device):
    g = torch.Generator().manual_seed(0)
    text_len = torch.full((B_PRIOR,), 40)
    enc = torch.randn(B_PRIOR, L, D, generator=g)
    mask = torch.arange(L)[None] < text_len[:, None]
    enc = enc * mask[..., None]  # padding positions are zero (DALLE2-pytorch derives its mask from that)
    return {
        "images": (torch.rand(B_UNET, 3, SIZE, SIZE, generator=g) * 2 - 1).to(device),
        "image_embed": torch.nn.functional.normalize(torch.randn(B_PRIOR, D, generator=g), dim=-1).to(device),
        "text_embed": torch.nn.functional.normalize(torch.randn(B_PRIOR, D, generator=g), dim=-1).to(device),
        "text_enc": enc.to(device),
        "text_mask": mask.to(device),
    }


# ---------------------------------------------------------------------------------------------------------------
# each library's cases: name -> a call to time


def t2i_cases(device, steps):
    sys.path.insert(0, str(ROOT))
    from t2i.diffusion import DenoisingObjective, Seeds, VPPath
    from t2i.models.prior import PriorNetwork
    from t2i.models.unet import Unet
    from t2i.pipelines.unclip import DecoderStage, PriorSpec, run_stage, sample_prior

    x = inputs(device)
    torch.manual_seed(0)
    unet = Unet(
        dim=64,
        dim_mults=(1, 2, 4),
        num_res_blocks=2,
        attn_levels=(False, True, True),
        self_attn=(False, False, False),
        heads=8,
        head_dim=32,
        image_embed_dim=D,
        text_embed_dim=D,
    ).to(device)
    prior = PriorNetwork(embed_dim=D, depth=6, heads=8, head_dim=64, text_token_dim=D, max_text_len=L).to(device)
    path = VPPath("cosine", 1000)
    unet_obj, prior_obj = DenoisingObjective(path, "eps"), DenoisingObjective(path, "x0")
    # t2i trains with its trainer's optimizer (t2i.train.optim: the fused AdamW kernel), DALLE2-pytorch with
    # torch's default AdamW, each as its own training code does
    from t2i.train.config import OptimConfig
    from t2i.train.optim import build_optimizer

    opt_u = build_optimizer(unet, OptimConfig(lr=1e-4, weight_decay=0.01))
    opt_p = build_optimizer(prior, OptimConfig(lr=1e-4, weight_decay=0.01))
    img_e, tok, msk = x["image_embed"][:B_UNET], x["text_enc"][:B_UNET], x["text_mask"][:B_UNET]
    t_u = torch.tensor([10.0, 200.0, 500.0, 900.0], device=device)

    def unet_forward():
        unet.eval()
        with torch.no_grad():
            unet(x["images"], t_u, image_embed=img_e, text_tokens=tok, text_mask=msk)

    def unet_train():
        unet.train()
        drop_i = torch.rand(B_UNET, device=device) < 0.1
        drop_t = torch.rand(B_UNET, device=device) < 0.5
        loss = unet_obj(
            unet, x["images"], image_embed=img_e, drop_image=drop_i, text_tokens=tok, text_mask=msk, drop_text=drop_t
        ).mean()
        loss.backward()
        opt_u.step()
        opt_u.zero_grad(set_to_none=True)

    stage = DecoderStage(unet, SIZE, path, "eps", sampler="ddim", steps=steps, guidance=3.0)

    def unet_sample():
        run_stage(stage, seeds=Seeds(list(range(B_UNET))), image_embed=img_e, text_tokens=tok, text_mask=msk)

    def prior_forward():
        prior.eval()
        with torch.no_grad():
            prior(
                x["image_embed"],
                torch.full((B_PRIOR,), 300.0, device=device),
                text_embed=x["text_embed"],
                text_tokens=x["text_enc"],
                text_mask=x["text_mask"],
            )

    def prior_train():
        prior.train()
        drop = torch.rand(B_PRIOR, device=device) < 0.1
        loss = prior_obj(
            prior,
            prior.scale_embed(x["image_embed"]),
            text_embed=x["text_embed"],
            text_tokens=x["text_enc"],
            text_mask=x["text_mask"],
            drop_text=drop,
        ).mean()
        loss.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)

    spec = PriorSpec(prior, path, "x0", sampler="ddim", steps=steps, guidance=2.0, num_candidates=1)

    def prior_sample():
        sample_prior(
            spec,
            x["text_embed"],
            text_tokens=x["text_enc"],
            text_mask=x["text_mask"],
            seeds=Seeds(list(range(B_PRIOR))),
        )

    def layout(precision: str) -> None:
        # as t2i's trainer and bf16 model folders run it: channels-last convolutions under bf16, default in fp32
        fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
        unet.to(memory_format=fmt)
        for st in opt_u.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() == 4:
                    st[k] = v.contiguous(memory_format=fmt)

    params = {"unet": sum(p.numel() for p in unet.parameters()), "prior": sum(p.numel() for p in prior.parameters())}
    return params, {
        "layout": layout,
        "unet/forward": unet_forward,
        "unet/train_step": unet_train,
        "unet/sample": unet_sample,
        "prior/forward": prior_forward,
        "prior/train_step": prior_train,
        "prior/sample": prior_sample,
    }


def dalle2_cases(device, steps):
    lib = torch.library.Library("torchvision", "DEF")  # see the module docstring's torchvision note
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    from dalle2_pytorch import Decoder, DiffusionPrior, DiffusionPriorNetwork, Unet

    x = inputs(device)
    torch.manual_seed(0)
    unet = Unet(
        dim=64,
        image_embed_dim=D,
        text_embed_dim=D,
        cond_dim=64,
        channels=3,
        dim_mults=(1, 2, 4),
        num_resnet_blocks=2,
        attn_heads=8,
        attn_dim_head=32,
        cond_on_image_embeds=True,
        cond_on_text_encodings=True,
        max_text_len=L,
    )
    decoder = Decoder(
        unet=unet,
        image_size=SIZE,
        timesteps=1000,
        sample_timesteps=steps,
        learned_variance=False,
        beta_schedule="cosine",
        image_cond_drop_prob=0.1,
        text_cond_drop_prob=0.5,
    ).to(device)
    unet = decoder.unets[
        0
    ]  # the Decoder re-instantiates the Unet it is given (DALLE2-pytorch's cast_model_parameters)
    net = DiffusionPriorNetwork(dim=D, depth=6, dim_head=64, heads=8, max_text_len=L)
    prior = DiffusionPrior(
        net=net,
        image_embed_dim=D,
        timesteps=1000,
        sample_timesteps=steps,
        cond_drop_prob=0.1,
        condition_on_text_encodings=True,
    ).to(device)
    opt_u = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    opt_p = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    img_e, tok = x["image_embed"][:B_UNET], x["text_enc"][:B_UNET]
    t_u = torch.tensor([10, 200, 500, 900], device=device)
    images01 = (x["images"] + 1) / 2  # DALLE2-pytorch takes [0, 1] images and normalises internally

    def unet_forward():
        unet.eval()
        with torch.no_grad():
            unet(x["images"], t_u, image_embed=img_e, text_encodings=tok)

    def unet_train():
        decoder.train()
        loss = decoder(images01, image_embed=img_e, text_encodings=tok, unet_number=1)
        loss.backward()
        opt_u.step()
        opt_u.zero_grad(set_to_none=True)

    def unet_sample():
        decoder.eval()
        with redirect_stderr(io.StringIO()):  # its progress bars (an exception still propagates)
            decoder.sample(image_embed=img_e, text_encodings=tok, cond_scale=3.0, one_unet_in_gpu_at_time=False)

    def prior_forward():
        net.eval()
        with torch.no_grad():
            net(
                x["image_embed"],
                torch.full((B_PRIOR,), 300, device=device),
                text_embed=x["text_embed"],
                text_encodings=x["text_enc"],
            )

    def prior_train():
        prior.train()
        # clone: DiffusionPrior.forward scales the caller's image_embed in place
        loss = prior(text_embed=x["text_embed"], image_embed=x["image_embed"].clone(), text_encodings=x["text_enc"])
        loss.backward()
        opt_p.step()
        opt_p.zero_grad(set_to_none=True)

    def prior_sample():
        prior.eval()
        cond = {"text_embed": x["text_embed"], "text_encodings": x["text_enc"]}
        with redirect_stderr(io.StringIO()):
            prior.p_sample_loop((B_PRIOR, D), text_cond=cond, cond_scale=2.0, timesteps=steps)

    params = {"unet": sum(p.numel() for p in unet.parameters()), "prior": sum(p.numel() for p in net.parameters())}
    return params, {
        "unet/forward": unet_forward,
        "unet/train_step": unet_train,
        "unet/sample": unet_sample,
        "prior/forward": prior_forward,
        "prior/train_step": prior_train,
        "prior/sample": prior_sample,
    }


def dalle2_site_packages() -> Path:
    """``.venv-dalle2``'s site-packages, after checking that every distribution it shares with this environment has
    the same version here (then importing DALLE2-pytorch from it into this process runs it exactly as its own venv
    would: the same torch build and the same einops, numpy, ... )."""
    import importlib.metadata as md

    site = ROOT / ".venv-dalle2" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if not (site / "dalle2_pytorch").is_dir():
        sys.exit("no .venv-dalle2 with dalle2-pytorch: run `make bench-dalle2` (it creates the venv and installs it)")
    ours = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions()}
    differ = []
    for d in md.distributions(path=[str(site)]):
        name = d.metadata["Name"].lower().replace("_", "-")
        if name in ours and ours[name] != d.version and name not in ("pip", "setuptools"):
            differ.append(f"{name} {ours[name]} here, {d.version} in .venv-dalle2")
    if differ:
        sys.exit(
            "the two venvs disagree on shared packages, so DALLE2-pytorch cannot run in this process: "
            + "; ".join(differ)
            + ". Rebuild .venv-dalle2 (`rm -r .venv-dalle2 && make bench-dalle2`)."
        )
    return site


def forward_flops(cases) -> dict[str, int]:
    """Forward FLOPs of each model (matmuls and convolutions), to judge the configs' sizes."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for model in ("unet", "prior"):
        with FlopCounterMode(display=False) as counter:
            cases[f"{model}/forward"]()
        flops[model] = counter.get_total_flops()
    return flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    # 1 thread by default: on a small shared CPU, OpenMP threads spin-wait on each other and the timings of 2+ threads
    # were incoherent (a train step faster than a forward); on a GPU it does not matter
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated substrings of case names, e.g. prior,unet/train")
    p.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), default=None,
        help="default: fp32, and bf16 where this machine multiplies bf16 natively (t2i info says)",
    )  # fmt: skip
    p.add_argument("--out", default="", help="also write the table to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precisions = args.precisions or timed_precisions(device.type)
    sys.path.append(str(dalle2_site_packages()))  # after t2i's own: the shared packages are checked to be equal
    params_t, cases_t = t2i_cases(device, args.sample_steps)
    params_d, cases_d = dalle2_cases(device, args.sample_steps)
    flops_t, flops_d = forward_flops(cases_t), forward_flops(cases_d)
    layout = cases_t.pop("layout")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    lines = [
        f"device {args.device}, torch {torch.__version__}, {args.threads} thread(s), sampling {args.sample_steps} "
        f"steps; both in one process, alternating; median and fastest of {args.repeats}",
        f"params: Unet t2i {params_t['unet'] / 1e6:.2f}M vs DALLE2 {params_d['unet'] / 1e6:.2f}M; "
        f"prior t2i {params_t['prior'] / 1e6:.2f}M vs DALLE2 {params_d['prior'] / 1e6:.2f}M",
        f"forward GFLOPs: Unet t2i {flops_t['unet'] / 1e9:.1f} vs DALLE2 {flops_d['unet'] / 1e9:.1f}; "
        f"prior t2i {flops_t['prior'] / 1e9:.1f} vs DALLE2 {flops_d['prior'] / 1e9:.1f}",
        "",
        "| case | precision | t2i (s) | DALLE2-pytorch (s) | speed-up, median (DALLE2 / t2i) | speed-up, fastest |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for precision in precisions:
        layout(precision)
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
        for name in cases_t:
            if args.only and not any(o in f"{name}/{precision}" for o in args.only.split(",")):
                continue

            def run(fn, ctx=ctx):
                def f():
                    with ctx():
                        fn()

                return f

            torch.manual_seed(0)
            a, b = alternate(run(cases_t[name]), run(cases_d[name]), args.repeats, sync)
            ta, tb = statistics.median(a), statistics.median(b)
            row = f"| {name} | {precision} | {ta:.4f} | {tb:.4f} | {tb / ta:.2f}x | {min(b) / min(a):.2f}x |"
            lines.append(row)
            print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
