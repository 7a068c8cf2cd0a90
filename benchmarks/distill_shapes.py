"""Score vs NFE on the shapes benchmark: a teacher with CFG at several step counts against its few-step students.

    python benchmarks/distill_shapes.py --teacher sd3-shapes --students models/sd3-shapes-lcm models/sd3-shapes-ladd

Every row is measured here on the same fixed subset of the ``eval`` split (``--per-category`` prompts of each
category, seeds from the split): overall GenEval-style score, text-track word accuracy, denoiser calls per image
(NFE: a CFG step costs two) and wall-clock seconds per image on this machine. Students run at their own preset
(their steps, no CFG) and at the extra ``--student-steps``.
"""

from __future__ import annotations

import argparse
import time

import torch

from t2i.eval.quality import _fn
from t2i.pipelines.folders import load_generator
from t2i.shapes.scoring import evaluate_generator


def measure(gen, settings, per_category: int) -> dict:
    calls = []
    net = gen.pipe.transformer if hasattr(gen.pipe, "transformer") else gen.pipe.stages[0].net
    handle = net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    t = time.perf_counter()
    try:
        report = evaluate_generator(_fn(gen, settings, 64), split="eval", size=settings.size,
                                    per_category=per_category, batch_size=512)  # fmt: skip
    finally:
        handle.remove()
    n = len(report.results)
    return {"overall": report.overall, "text": report.accuracy().get("text"), "nfe": sum(calls) / n,
            "sec_per_image": (time.perf_counter() - t) / n, "n": n}  # fmt: skip


def write_grid(path: str, teacher, students) -> None:
    """Rows: the teacher at 28 and 4 steps with CFG, then each student at its preset; the same prompts and seeds."""
    from t2i.io.png import contact_sheet, to_pil
    from t2i.shapes.captions import split_prompts

    cats = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
    prompts = [next(p for p in split_prompts("eval") if p.spec.category == c) for c in cats]
    rows = [(teacher, teacher.settings(steps=28)), (teacher, teacher.settings(steps=4))]
    rows += [(gen, gen.defaults) for gen in students]
    images, labels = [], []
    for gen, s in rows:
        out = gen.generate([p.caption for p in prompts], [p.seed for p in prompts], s)
        images += [to_pil(im) for im in out]
        nfe = s.steps * (2 if s.guidance != 1.0 else 1)
        labels += [f"{gen.name}, {s.steps} steps ({nfe} NFE): {p.caption}" for p in prompts]
    contact_sheet(images, labels, cell=128, columns=len(prompts)).save(path)
    print(f"grid: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="sd3-shapes")
    ap.add_argument("--teacher-steps", type=int, nargs="+", default=[4, 8, 28, 50])
    ap.add_argument("--students", nargs="*", default=[])
    ap.add_argument("--student-steps", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--per-category", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="also write an image grid: teacher at 28 and 4 steps, each student at its preset")
    ap.add_argument("--no-scores", action="store_true", help="only the grid")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    teacher = load_generator(args.teacher)
    students = [load_generator(path) for path in args.students]
    if args.grid:
        write_grid(args.grid, teacher, students)
    if args.no_scores:
        return
    rows = []
    for n in args.teacher_steps:
        s = teacher.settings(steps=n)
        rows.append((f"{teacher.name} (teacher, CFG {s.guidance})", s, measure(teacher, s, args.per_category)))
    for gen in students:
        for n in sorted({gen.defaults.steps, *args.student_steps}):
            s = gen.settings(steps=n)
            guidance = "no CFG" if s.cfg == 1.0 else f"CFG {s.cfg}"
            rows.append((f"{gen.name} ({s.sampler}, {guidance})", s, measure(gen, s, args.per_category)))
    print(f"shapes `eval`, first {args.per_category} prompts per category, {args.threads} threads\n")
    print("| model | steps | NFE / image | overall | text words | s / image |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s, r in rows:
        text = "-" if r["text"] is None else f"{r['text']:.3f}"
        print(f"| {name} | {s.steps} | {r['nfe']:.0f} | {r['overall']:.3f} | {text} | {r['sec_per_image']:.3f} |")


if __name__ == "__main__":
    main()
