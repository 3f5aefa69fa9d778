"""sharpscope inside other training frameworks: sharpness-tracking callbacks
(:mod:`~sharpscope.integrations.hf_callback`, :mod:`~sharpscope.integrations.lightning_callback`)
and SAM-family training (:mod:`~sharpscope.integrations.hf_sam`,
:mod:`~sharpscope.integrations.lightning_sam`). Each module imports its framework when it is
imported itself; ``import sharpscope`` imports none."""
