"""unclip_lite: unCLIP (DALL-E 2, Ramesh et al. 2022) rebuilt at reduced scale.

Modules, in the order data flows through them: shapes (the data world), data (datasets and
caches), evaluate (the judge and metrics), checkpoint (artifacts), train (the training loop),
config (presets), runtime (device, precision, seeding), course (the notebook runner).
"""
__version__ = "0.1.0"
