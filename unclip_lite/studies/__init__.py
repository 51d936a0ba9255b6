"""Measurements built on top of the stages and the pipeline: each module serves notebooks and
benchmarks, and none is imported by the stages themselves.

- `stages`: the decoder's, the priors' and the cascade's comparisons (notebooks 05-09);
- `embeddings`: what CLIP's embeddings keep (notebook 04);
- `latents`: inversion, variations, text diffs and interpolations, measured (notebooks 10 and 11);
- `claims`: the paper's claims at toy scale (notebook 12).
"""
