"""The shipped default models (models/): they load, fit the size budget, and reproduce fixed-seed golden slices.

The slices were recorded from the shipped files with the settings below (few steps, so the default suite stays
fast), in fp32: any change to the weights, the pipelines, the samplers or the loaders that moves an image shows up
here. The folders ask for bf16 (``"precision"`` in model.json); that fast path is checked against fp32 separately.
"""

from __future__ import annotations

import pytest
import torch

from t2i.pipelines.folders import SHIPPED, load_generator, model_folder

PROMPT = "a red circle above a blue square"
# (steps, seed, pixels [0, 1] of rows 30-31, columns 30-33 of each channel of the 64 px image)
GOLDEN = {
    # 10 steps: the second falls in the skip-layer guidance window and the first ones above the guidance interval
    # (its defaults), so the slice covers both
    "sd3-shapes": (10, 7, [0.2773, 0.6681, 0.9153, 0.9293, 0.2393, 0.6101, 0.9018, 0.9288, 0.352, 0.7144, 0.931,
                           0.9232, 0.3276, 0.6672, 0.9337, 0.9282, 0.9064, 0.9588, 0.9248, 0.9029, 0.9066, 0.943,
                           0.9407, 0.9031]),
    "unclip-shapes": (4, 7, [0.8992, 0.8796, 0.9085, 0.9032, 0.923, 0.9133, 0.906, 0.9184, 0.9235, 0.9366, 0.9186,
                             0.9103, 0.9109, 0.9309, 0.908, 0.9017, 0.9098, 0.8906, 0.919, 0.9032, 0.9109, 0.9269,
                             0.9092, 0.9284]),
    "sd3-shapes-turbo": (4, 7, [0.482, 0.5451, 0.6092, 0.6954, 0.1545, 0.1701, 0.1843, 0.2434, 0.5679, 0.6217,
                                0.6454, 0.6882, 0.2635, 0.2773, 0.2907, 0.343, 0.9385, 0.9592, 0.9516, 0.9451, 0.9207,
                                0.9165, 0.9033, 0.8779]),
}  # fmt: skip


def golden_slice(image: torch.Tensor) -> list[float]:
    return [round(v, 4) for v in image[:, 30:32, 30:34].flatten().tolist()]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_fits_the_size_budget(name):
    folder = model_folder(name)
    assert folder is not None, f"models/{name} is missing"
    for f in folder.glob("*.safetensors"):
        assert f.stat().st_size <= 10_000_000, f"{f} is over 10 MB"
    assert (folder / "README.md").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_golden_slice(name):
    steps, seed, expected = GOLDEN[name]
    gen = load_generator(name, precision="fp32")
    s = gen.settings(steps=steps)
    image = gen.generate([PROMPT], [seed], s)
    assert image.shape == (1, 3, 64, 64)
    torch.testing.assert_close(torch.tensor(golden_slice(image[0])), torch.tensor(expected), atol=2e-3, rtol=0)
    again = gen.generate([PROMPT, "a green cross"], [seed, seed + 1], s)  # batch composition does not matter
    torch.testing.assert_close(again[0], image[0], atol=1e-3, rtol=0)  # batched kernels: ~1e-4 apart


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_runs_bf16_by_default_close_to_fp32_and_batch_invariant(name):
    from t2i.nn.precision import bf16_is_native

    # the folders ask for bf16, which they get where the CPU multiplies bf16 natively (else fp32: see
    # test_model_folder_loading); the bf16 path itself is checked against fp32 on every machine
    native = bf16_is_native("cpu")
    assert load_generator(name).precision == ("bf16" if native else "fp32")
    gen = load_generator(name, precision="bf16")
    prompts, seeds = [PROMPT, "a green cross", "two yellow triangles"], [7, 8, 9]
    if not native:  # emulated bf16 (no user gets it by default): one image keeps the test from taking minutes
        prompts, seeds = prompts[:1], seeds[:1]
    s = gen.settings()  # the default steps: what a user gets
    fast = gen.generate(prompts, seeds, s)
    plain = load_generator(name, precision="fp32").generate(prompts, seeds, s)
    diff = (fast - plain).abs().flatten(1)
    # the same images: measured mean 4e-4 to 2.5e-3, 99th percentile 9e-3 to 2.9e-2 on an Intel CPU with AMX; on an
    # AMD EPYC (AVX-512 BF16, no AMX: other bf16 kernels) unclip-shapes gives mean 1e-3 to 6e-3. unCLIP's DDPM
    # moves an edge by a pixel here and there, hence no bound on the maximum; and its ancestral noise can grow
    # bf16's rounding into a marginal object drawn or not: since its prior samples 8 steps, the first prompt here
    # gets a faint extra blob in bf16 on that AMD CPU (that image's 99th percentile 0.37, the others' <= 5e-3), so
    # one image of the three may differ so
    assert diff.mean() < 0.01, diff.mean()
    p99 = diff.quantile(0.99, dim=1)
    assert (p99 < 0.12).sum() >= len(prompts) - (name == "unclip-shapes"), p99
    if native:
        alone = gen.generate(prompts[:1], seeds[:1], s)
        # measured <= 3.1e-2 (2 of 12288 values above 0.02, sd3-shapes with the caption encoder): a seed keeps its
        # image
        torch.testing.assert_close(alone[0], fast[0], atol=0.04, rtol=0)
