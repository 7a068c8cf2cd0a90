"""t2i's unCLIP Unet and prior against DALLE2-pytorch's on matching configs: forward, training step, sampling.

    make bench-dalle2                      # builds .venv-dalle2 (dalle2-pytorch 1.15.6 beside torch 2.13), runs this
    .venv/bin/python benchmarks/vs_dalle2_pytorch.py --sample-steps 50 --repeats 3 --device cpu

The driver (run with t2i's venv) starts one worker process per implementation: t2i's in its own venv, DALLE2-pytorch's
in ``.venv-dalle2`` (it pins torchvision, which t2i does not need). Both venvs hold the same torch build, and each
worker reports its torch version so the table can be checked.

Matching configs (the issue's): Unet dim 64, dim_mults (1, 2, 4), 2 ResNet blocks per level, 8 heads x 32, 64x64,
batch 4, conditioned on a 512-d image embedding and 77 x 512 text encodings (DALLE2-pytorch: ``cond_on_image_embeds``
and ``cond_on_text_encodings``; t2i: ``image_embed_dim`` and ``text_embed_dim``), eps prediction, cosine schedule,
1000 training steps; prior dim 512, depth 6, 8 heads x 64, batch 32, text encodings of 77 tokens, x0 prediction.
Other architecture details follow each library's defaults (they differ: e.g. DALLE2-pytorch's cross-embed
input layer and multi-query attention); parameter counts are printed so the comparison can be judged.

Measured: forward (no grad, eval), training step (loss from clean data with noising, backward, AdamW step), and
sampling (DDIM with classifier-free guidance: decoder scale 3, prior scale 2; DALLE2-pytorch runs cond and uncond
as two forward passes, t2i as one batched pass), each in fp32 and under bf16 autocast, median of ``--repeats``
after one warm-up. Ratios are DALLE2-pytorch time / t2i time (> 1: t2i is faster).

torchvision note: PyPI's torchvision wheels link CUDA torch libraries (libc10_cuda.so), so their compiled ops do not
load beside the CPU torch build, and torchvision 0.28's ``import`` then fails on two unguarded fake-kernel
registrations (``torchvision::nms``, ``torchvision::qnms``). The DALLE2 worker defines those two operator schemas
(no kernels) before importing, which is all the import needs; neither DALLE2-pytorch's Unet nor its prior calls
any torchvision op.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
B_UNET, SIZE, B_PRIOR, D, L = 4, 64, 32, 512, 77


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


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
# workers


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


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params, cases = (t2i_cases if args.impl == "t2i" else dalle2_cases)(device, args.sample_steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for model in ("unet", "prior"):  # forward FLOPs (matmuls and convolutions), to judge the configs' sizes
        with FlopCounterMode(display=False) as counter:
            cases[f"{model}/forward"]()
        flops[model] = counter.get_total_flops()
    results = {}
    layout = cases.pop("layout", lambda precision: None)
    for precision in ("fp32", "bf16"):
        layout(precision)
        for name, fn in cases.items():
            if args.only and not any(o in f"{name}/{precision}" for o in args.only.split(",")):
                continue
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

            def run(fn=fn, ctx=ctx):
                with ctx:
                    fn()

            torch.manual_seed(0)
            results[f"{name}/{precision}"] = timed(run, args.repeats, sync)
            print(f"[{args.impl}] {name}/{precision}: {results[f'{name}/{precision}']:.4f}s", file=sys.stderr)
    out = {"impl": args.impl, "torch": torch.__version__, "params": params, "flops": flops, "seconds": results}
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# driver


def driver(args) -> None:
    pythons = {"t2i": sys.executable, "dalle2": str(ROOT / ".venv-dalle2" / "bin" / "python")}
    if not Path(pythons["dalle2"]).exists():
        sys.exit("no .venv-dalle2: run `make bench-dalle2` (it creates the venv and installs dalle2-pytorch)")
    common = [
        "--device",
        args.device,
        "--sample-steps",
        str(args.sample_steps),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ] + (["--only", args.only] if args.only else [])
    reports = {}
    for impl, py in pythons.items():
        out = subprocess.run([py, __file__, "--impl", impl, *common], check=True, capture_output=True, text=True)
        reports[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    t2i, ref = reports["t2i"], reports["dalle2"]
    lines = [
        f"device {args.device}, {args.threads} threads, sampling {args.sample_steps} steps, median of {args.repeats}",
        f"torch: t2i worker {t2i['torch']}, DALLE2-pytorch worker {ref['torch']}",
        f"params: Unet t2i {t2i['params']['unet'] / 1e6:.2f}M vs DALLE2 {ref['params']['unet'] / 1e6:.2f}M; "
        f"prior t2i {t2i['params']['prior'] / 1e6:.2f}M vs DALLE2 {ref['params']['prior'] / 1e6:.2f}M",
        f"forward GFLOPs: Unet t2i {t2i['flops']['unet'] / 1e9:.1f} vs DALLE2 {ref['flops']['unet'] / 1e9:.1f}; "
        f"prior t2i {t2i['flops']['prior'] / 1e9:.1f} vs DALLE2 {ref['flops']['prior'] / 1e9:.1f}",
        "",
        "| case | precision | t2i (s) | DALLE2-pytorch (s) | speed-up (DALLE2 / t2i) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for key, t in t2i["seconds"].items():
        name, precision = key.rsplit("/", 1)
        r = ref["seconds"][key]
        lines.append(f"| {name} | {precision} | {t:.4f} | {r:.4f} | {r / t:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=2) + "\n\n" + text + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=("t2i", "dalle2"), help="run one worker (internal; the driver sets it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    # 1 thread by default: on a small shared CPU, OpenMP threads spin-wait on each other and the timings of 2+ threads
    # were incoherent (a train step faster than a forward); on a GPU it does not matter
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated substrings of case names, e.g. prior,unet/train")
    p.add_argument("--out", default="", help="also write the JSON reports and the table to this file")
    args = p.parse_args()
    worker(args) if args.impl else driver(args)


if __name__ == "__main__":
    main()
