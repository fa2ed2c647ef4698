"""Meta-learning: FOMAML (and meta-LoRA) over MATH subjects as tasks, and adaptation evaluation.

``tasks`` loads and samples the per-subject support/query sets, ``fomaml`` is the meta-learner
and the ``rlmeta train-fomaml`` step, ``distributed`` the torchrun/FSDP2 layout and
checkpoints, ``adaptation_eval`` the base-versus-meta comparison. See docs/meta-learning.md.
"""
