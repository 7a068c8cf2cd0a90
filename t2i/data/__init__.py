"""Data: the procedural shapes world (``shapes``), its captions and splits (``captions``), the shapes torch
Dataset and writers (``dataset``), and the training system's loaders.

Import the submodules directly (``from t2i.data.dataset import ShapesDataset``); this file stays import-free so
``import t2i.data.shapes`` does not pull in torch.
"""
