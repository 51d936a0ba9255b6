"""unclip_lite: unCLIP (DALL-E 2, Ramesh et al. 2022) rebuilt at reduced scale.

Modules, bottom to top (a module imports only from those before it; docs/ARCHITECTURE.md says
what each owns and where new work goes; tests/test_architecture.py keeps the order):

    config · runtime · checkpoint · images, stats · shapes, icons · geometry, data
    · diffusion, unet, transformer, clip_model · prior_nets · train · stage · judge · clip
    · decoder, upsampler, prior · pipeline · manipulate
    · studies (stages, latents, claims, embeddings, judge_free) · build · widgets, plotting
    · course, commands · __main__
"""
__version__ = "0.1.0"
