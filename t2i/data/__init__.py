"""Data: the training system's loaders (folders, tar shards, cached embeddings, toy data) and the shapes world as
a torch Dataset (``dataset``). The world itself lives in ``t2i.shapes``.

Import the submodules directly (``from t2i.data.dataset import ShapesDataset``); this file stays import-free so
importing one loader does not pull in the others.
"""
