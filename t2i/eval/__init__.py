"""Evaluation: the weight-free shapes benchmark (``shapes``) and its feature-space distribution metric
(``features``, weights trained by ``train_features``). Import the submodules directly."""
