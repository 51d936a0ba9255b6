"""The judge-free measures (studies/judge_free.py): exact values on a stand-in reader whose
embeddings are known, and the agreement statistic against a right/wrong reading."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip_lite.studies import judge_free


class KeyedReader:
    """A stand-in for a CLIP model: an image's embedding is the unit vector of its first pixel's
    value (images are filled with one value per image), a caption's is the unit vector of the
    number it names ("item 3"), so a right pair has cosine 1 and a wrong one cosine 0."""

    dim = 8

    def encode_images(self, images):
        keys = images.reshape(len(images), -1)[:, 0].long()
        return F.one_hot(keys, self.dim).float()

    def encode_texts(self, texts):
        return F.one_hot(torch.tensor([int(t.split()[-1]) for t in texts]), self.dim).float()


def _images(keys):
    return torch.tensor(keys, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()


def test_clip_score_is_100_for_a_right_pair_and_0_for_a_wrong_one():
    reader = KeyedReader()
    scores = judge_free.clip_scores(reader, _images([1, 2, 3]), ["item 1", "item 2", "item 5"])
    assert scores.tolist() == [100.0, 100.0, 0.0]
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        judge_free.clip_scores(reader, _images([1, 2, 3]), ["item 1", "item 2"])


def test_retrieval_finds_each_captions_own_images_and_states_chance():
    reader = KeyedReader()
    captions = ["item 1", "item 1", "item 2", "item 3"]
    hits = judge_free.retrieval_hits(reader, _images([1, 1, 2, 4]), captions, k=2)  # item 3's image drew a 4
    assert hits["top1"].tolist() == [1.0, 1.0, 0.0]  # distinct captions in sorted order: item 1, item 2, item 3
    assert hits["chance"].tolist() == [0.5, 0.25, 0.25]


def test_frechet_on_clip_features_is_near_zero_for_the_same_set_and_grows_with_a_shift():
    class Gaussian:
        def encode_images(self, x):
            return x.reshape(len(x), -1)[:, :6].float()
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 6, generator=g)
    same = judge_free.frechet_clip(Gaussian(), real, real, dims=4)
    shifted = judge_free.frechet_clip(Gaussian(), real + 1.0, real, dims=4)
    assert abs(same[0]) < 1e-6 and shifted[0] > 3.0  # the mean moved by 1 in each of 4 kept directions


def test_agreement_auroc():
    perfect = judge_free.agreement([5, 6, 7, 1, 2], [True, True, True, False, False])
    assert perfect["auroc"] == 1.0 and perfect["n_right"] == 3 and perfect["n_wrong"] == 2
    assert judge_free.agreement([1, 1, 1, 1], [True, False, True, False])["auroc"] == 0.5  # ties: no agreement
    assert judge_free.agreement([1, 2, 3, 4], [False, False, True, True])["auroc"] == 1.0
    assert judge_free.agreement([4, 3, 2, 1], [False, False, True, True])["auroc"] == 0.0
    assert np.isnan(judge_free.agreement([1, 2], [True, True])["auroc"])  # nothing to compare against


def test_report_on_a_trained_pipeline_has_every_measure(smoke_pipe):
    from unclip_lite.config import get_preset
    from unclip_lite.data import rendered
    from unclip_lite.shapes import ShapesWorld
    real = rendered(ShapesWorld("val", get_preset("smoke").world), 24)
    captions = real["captions"][:6]
    images = smoke_pipe.generate(captions, seed=0, progress=False, steps=2)
    out = judge_free.judge_free_report(smoke_pipe.clip, images, captions, real, seed=0)
    assert out["n"] == 6 and set(out["retrieval"]) == {"top1", "top5", "chance"}
    assert out["clip_scores"] == pytest.approx(judge_free.clip_scores(smoke_pipe.clip, images, captions).tolist(), abs=1e-3)
    for key in ("clip_score", "clip_score_real", "clip_score_shuffled", "frechet_clip"):
        m, lo, hi = out[key]
        assert np.isfinite(m) and lo <= hi, (key, out[key])
