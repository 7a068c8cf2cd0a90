"""Evaluation that runs models: the quality report of shipped models (``quality``) and the CLIP counterfactual
probe (``clip_probe``). The benchmark they score on, with its detector, rules and feature metric, is
``t2i.shapes``. Import the submodules directly."""
