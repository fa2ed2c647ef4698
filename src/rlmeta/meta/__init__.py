"""Meta-learning: FOMAML, Reptile and the multi-task baseline (and meta-LoRA) over MATH subjects as tasks,
and the adaptation evaluation on held-out subjects.

``tasks`` loads and samples the per-subject support/query sets and the evaluation episodes,
``fomaml`` is the learner (every ``meta.method``) and the ``rlmeta train-fomaml`` step,
``distributed`` the torchrun/FSDP2 layout and checkpoints, ``adaptation_eval`` the comparison of
the base initialisation and every trained method at equal compute. See docs/meta-learning.md.
"""
