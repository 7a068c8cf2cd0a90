"""The shapes world: t2i's own benchmark, from the scenes and their captions to the verdict on a generated image.

A procedural, captioned world modelled on GenEval (Ghosh et al. 2023), simple enough that a tiny model learns it
on a CPU, with an evaluator that checks every image exactly and needs no downloaded weights (docs/shapes.md).
The modules, each importing only those above it:

- ``world``: palette, shapes, scenes, object placement, and ``as_uint8`` (the one pixel format judged: floats are
  read in [0, 1], the public API's convention);
- ``text``: the text track, words drawn with Pillow's bundled font and read back;
- ``specs``: what a caption claims (``Spec``, ``Prompt``), the held-out pairs and relations, GenEval's relation rule;
- ``scenes``: random specs, ground-truth scenes and images, the failure scenes that calibrate the evaluator;
- ``captions``: the paraphrase grammar, counterfactual rewrites, the train stream, the fixed splits and the
  shapes CLIP's vocabulary (``shapes_tokenizer``);
- ``folders``: the benchmark's folder format (``metadata.jsonl`` + images) and ground-truth writers;
- ``detect``: weight-free object detection;
- ``probe``: the shipped feature probe, FD-probe and KID (and its training recipe);
- ``scoring``: GenEval's rules, the report, and the entry points that score a folder or a generator.

This file stays import-free so that ``import t2i.shapes.world`` does not pull in torch; only ``probe`` needs it.
The torch Dataset that streams the world for training is ``t2i.data.dataset.ShapesDataset``.
"""
