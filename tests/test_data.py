import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from unclip_lite.config import WorldConfig
from unclip_lite.data import CaptionFolder, DataError, rendered
from unclip_lite.images import to_float, to_numpy_hwc
from unclip_lite.shapes import ShapesWorld

EXAMPLE = ROOT / "data" / "example"


def _folder(tmp_path, lines, fmt="jsonl", n_images=3):
    for i in range(n_images):
        Image.fromarray(ShapesWorld("val")[i].image).save(tmp_path / f"im{i}.png")
    if fmt == "jsonl":
        (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    else:
        (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_example_folder_has_shapesworld_interface():
    ds = CaptionFolder(EXAMPLE)
    assert len(ds) == 24 and ds.skipped == []
    s = ds[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.caption and s.attributes["objects"]
    # the stored images are the ShapesWorld scenes, losslessly
    assert s.image.tobytes() == ShapesWorld("val")[0].image.tobytes()


def test_example_folder_is_small_and_regenerates_identically(tmp_path):
    size = sum(p.stat().st_size for p in EXAMPLE.iterdir())
    assert size < 1_000_000
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for p in EXAMPLE.iterdir():  # pixels, not PNG bytes (those depend on the zlib version)
        if p.suffix == ".png":
            assert np.array_equal(np.asarray(Image.open(tmp_path / p.name)), np.asarray(Image.open(p))), p.name
        else:
            assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_a_spreadsheets_byte_order_mark_is_tolerated(tmp_path):
    folder = _folder(tmp_path, ["file,caption", "im0.png,a thing"], "csv")
    (folder / "captions.csv").write_text("\ufefffile,caption\nim0.png,a thing\n", encoding="utf-8")
    assert CaptionFolder(folder)[0].caption == "a thing"


def test_csv_works(tmp_path):
    ds = CaptionFolder(_folder(tmp_path, ["file,caption", "im0.png,a thing", "im1.png,\"another, thing\""], "csv"))
    assert [ds[i].caption for i in range(len(ds))] == ["a thing", "another, thing"]


def test_non_square_images_are_centre_cropped(tmp_path):
    Image.new("RGB", (120, 80), (10, 20, 30)).save(tmp_path / "wide.jpg")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "wide.jpg", "caption": "x"}) + "\n")
    assert CaptionFolder(tmp_path, image_size=32)[0].image.shape == (32, 32, 3)


@pytest.mark.parametrize("lines, fmt, message", [
    (['{"file": "missing.png", "caption": "a"}'], "jsonl", r"captions.jsonl, line 1: image file .*missing.png does not exist"),
    (['{"file": "im0.png", "caption": "a"}', '{"file": "im1.png", "caption": "  "}'], "jsonl", r"line 2: empty caption for 'im1.png'"),
    (['{"file": "im0.png", "text": "a"}'], "jsonl", r"line 1: missing field\(s\) \['caption'\], unknown field\(s\) \['text'\]"),
    (['{"file": "im0.png", "caption": "a"}', 'not json'], "jsonl", r"line 2: not valid JSON"),
    (["file,text", "im0.png,a"], "csv", r"captions.csv, line 1: the header must be file,caption"),
    (["file,caption", "im0.png,"], "csv", r"captions.csv, line 2: empty caption"),
    (["file,caption", "im0.png,a,extra"], "csv", r"captions.csv, line 2: 1 more field\(s\) than the header"),
    (['{"file": "im0.png", "caption": "a", "attributes": "{oops"}'], "jsonl", r"line 1: the attributes of 'im0.png' are not valid JSON"),
    (['{"file": "im0.png", "caption": "a", "attributes": [1, 2]}'], "jsonl", r"line 1: the attributes of 'im0.png' must be a JSON object"),
])
def test_bad_entries_name_the_file_and_line(tmp_path, lines, fmt, message):
    with pytest.raises(DataError, match=message):
        CaptionFolder(_folder(tmp_path, lines, fmt))


def test_corrupt_image_is_reported(tmp_path):
    folder = _folder(tmp_path, ['{"file": "im0.png", "caption": "a"}', '{"file": "bad.png", "caption": "b"}'])
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"line 2: image file .*bad.png cannot be read as an image"):
        CaptionFolder(folder)


def test_skip_mode_skips_and_counts(tmp_path):
    folder = _folder(tmp_path, [
        '{"file": "im0.png", "caption": "good"}',
        '{"file": "nope.png", "caption": "missing file"}',
        '{"file": "im1.png", "caption": ""}',
        '{"file": "bad.png", "caption": "corrupt"}',
        'garbage',
        '{"file": "im2.png", "caption": "also good"}',
    ])
    (folder / "bad.png").write_bytes(b"junk")
    ds = CaptionFolder(folder, on_error="skip")
    assert [ds[i].caption for i in range(len(ds))] == ["good", "also good"]
    assert len(ds.skipped) == 4 and all("captions.jsonl, line" in s for s in ds.skipped)


def test_missing_index_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="neither captions.jsonl nor captions.csv"):
        CaptionFolder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        CaptionFolder(tmp_path / "nothing")


def test_rendered_cache_round_trips(tmp_path):
    world = ShapesWorld("val", WorldConfig(n_val=20))
    first = rendered(world, 12, cache_dir=tmp_path)
    assert first["images"].shape == (12, 3, 64, 64)
    cached = rendered(world, 12, cache_dir=tmp_path)
    assert (cached["images"] == first["images"]).all() and cached["captions"] == first["captions"]
    assert len(list(tmp_path.iterdir())) == 1
    folder = rendered(CaptionFolder(EXAMPLE), 5, cache_dir=tmp_path)
    assert folder["images"].shape == (5, 3, 64, 64)


def test_tensor_conversions_round_trip():
    img = np.stack([ShapesWorld("val")[i].image for i in range(3)])
    x = to_float(torch.from_numpy(img).permute(0, 3, 1, 2))
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert (to_numpy_hwc(x) == img).all()


def test_exif_orientation_is_applied_and_transparency_becomes_white(tmp_path):
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[10:16] = 255  # upright: a white band at the top of the centre square (rows 10-30)
    im = Image.fromarray(np.rot90(tall).copy())  # stored 20 x 40 wide, EXIF says "rotate 90 CW to view"
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)  # a red square on a fully transparent ground
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "phone.jpg", "caption": "a photo"}\n'
                                             '{"file": "icon.png", "caption": "a red icon"}\n')
    ds = CaptionFolder(tmp_path, image_size=16)
    photo, icon = ds[0].image, ds[1].image
    assert photo.shape == (16, 16, 3)
    assert photo[:3].mean() > 200 and photo[-3:].mean() < 30  # the band on top, as the phone showed it
    assert abs(photo[:, :3].mean() - photo[:, -3:].mean()) < 10  # not a stripe down one side
    assert icon[0, 0].tolist() == [255, 255, 255] and icon[8, 8].tolist() == [255, 0, 0]


@pytest.mark.parametrize("name, message", [
    ("../outside.png", r"line 1: file '../outside.png' leads outside the folder"),
    ("/etc/hostname", r"line 1: file '/etc/hostname' is an absolute path"),
    ("link.png", r"line 1: file 'link.png' goes through the symlink .*link.png; pass allow_symlinks=True"),
])
def test_entries_that_leave_the_folder_are_refused_by_line(tmp_path, name, message):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.fromarray(ShapesWorld("val")[0].image).save(tmp_path / "outside.png")
    Image.fromarray(ShapesWorld("val")[0].image).save(folder / "im0.png")
    (folder / "link.png").symlink_to(folder / "im0.png")
    (folder / "captions.jsonl").write_text(json.dumps({"file": name, "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=message):
        CaptionFolder(folder)
    if name == "link.png":  # a link that stays inside the folder, allowed by the flag
        assert len(CaptionFolder(folder, allow_symlinks=True)) == 1


def test_a_decompression_bomb_is_reported_per_file(tmp_path, monkeypatch):
    folder = _folder(tmp_path, ['{"file": "im0.png", "caption": "a"}', '{"file": "im1.png", "caption": "b"}'])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # any 32 x 32 image is now "too large"
    with pytest.raises(DataError, match=r"line 1: image file .*im0.png is too large to decode safely"):
        CaptionFolder(folder)


def test_the_folder_cache_is_keyed_on_file_content(tmp_path):
    from unclip_lite.data import dataset_key
    folder = _folder(tmp_path, ['{"file": "im0.png", "caption": "a"}'])
    before = dataset_key(CaptionFolder(folder), 1)
    stat = (folder / "im0.png").stat()
    Image.fromarray(ShapesWorld("val")[1].image).save(folder / "im0.png")  # other pixels...
    os.utime(folder / "im0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...same modification time
    assert dataset_key(CaptionFolder(folder), 1) != before


# ---------------------------------------------------------------------------------------------
# A caption folder as every stage's data source


def _folder_preset(root, **data):
    from unclip_lite.config import get_preset, set_field
    preset = set_field(get_preset("smoke"), "data.source", str(root))
    for key, value in data.items():
        preset = set_field(preset, f"data.{key}", value)
    return preset


def test_a_folder_splits_into_disjoint_train_and_val_by_a_seeded_hash(tmp_path):
    from unclip_lite.data import dataset, in_val
    from unclip_lite.icons import make_icon_folder
    root = make_icon_folder(tmp_path / "icons", n=200, seed=0)
    preset = _folder_preset(root, val_fraction=0.2)
    train, val = dataset(preset, "train"), dataset(preset, "val")
    names = lambda d: {p.name for p, _, _ in d.entries}  # noqa: E731
    assert not names(train) & names(val) and len(train) + len(val) == 200
    assert 20 <= len(val) <= 60  # 20% of 200 by a hash: 40 expected
    assert names(dataset(preset, "val")) == names(val)  # the same folder and seed: the same split
    assert names(dataset(_folder_preset(root, val_fraction=0.2, split_seed=1), "val")) != names(val)
    assert in_val("icon_00007.png", 0.2, 0) == in_val("icon_00007.png", 0.2, 0)  # a file's side depends on its name only
    sample = train[0]
    assert sample.image.shape == (64, 64, 3) and sample.caption


def test_shapesworld_only_requests_on_a_folder_say_what_to_use_instead(tmp_path):
    from unclip_lite.data import NeedsShapesWorld, dataset
    from unclip_lite.icons import make_icon_folder
    from unclip_lite.judge import ensure_judge
    root = make_icon_folder(tmp_path / "icons", n=40, seed=0)
    preset = _folder_preset(root)
    with pytest.raises(NeedsShapesWorld, match="'heldout' split needs ShapesWorld"):
        dataset(preset, "heldout")
    with pytest.raises(NeedsShapesWorld, match="the judge needs ShapesWorld.*judge-free"):
        ensure_judge(tmp_path / "artifacts", preset)
    assert not (tmp_path / "artifacts" / "judge").exists()


def test_a_stage_records_the_folder_and_its_content(tmp_path):
    from unclip_lite.data import _FOLDERS, source_config
    from unclip_lite.icons import make_icon_folder
    root = make_icon_folder(tmp_path / "icons", n=30, seed=0)
    preset = _folder_preset(root)
    first = source_config(preset)["data"]
    assert first["source"] == str(root.resolve()) and first["entries"] == 30 and "world" not in source_config(preset)
    lines = (root / "captions.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["caption"] = "a caption edited by hand"
    (root / "captions.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    _FOLDERS.clear()  # a new process would read the folder afresh
    assert source_config(preset)["data"]["content"] != first["content"]  # stored stages become stale, not mixed


def test_an_empty_val_split_is_an_error_naming_the_setting(tmp_path):
    from unclip_lite.data import dataset
    from unclip_lite.icons import make_icon_folder
    root = make_icon_folder(tmp_path / "icons", n=5, seed=0)
    with pytest.raises(DataError, match="val split is empty.*data.val_fraction"):
        dataset(_folder_preset(root, val_fraction=0.0), "val")


def test_icon_folder_is_deterministic_and_kept_when_made_again(tmp_path):
    from unclip_lite.icons import make_icon_folder
    a = make_icon_folder(tmp_path / "a", n=12, seed=3)
    b = make_icon_folder(tmp_path / "b", n=12, seed=3)
    assert (a / "captions.jsonl").read_text() == (b / "captions.jsonl").read_text()
    assert (a / "icon_00011.png").read_bytes() == (b / "icon_00011.png").read_bytes()
    stamp = (a / "captions.jsonl").stat().st_mtime_ns
    make_icon_folder(a, n=12, seed=3)
    assert (a / "captions.jsonl").stat().st_mtime_ns == stamp
    folder = CaptionFolder(a)
    assert len(folder) == 12 and all(c for _, c, _ in folder.entries)


@pytest.mark.slow
def test_every_stage_trains_on_a_folder_from_one_command(tmp_path):
    """`train all --data DIR`: CLIP, the decoder, both priors and the upsampler on a caption
    folder that is not ShapesWorld, then the cascade loads and draws from a caption."""
    from unclip_lite.checkpoint import read_json
    from unclip_lite.icons import make_icon_folder
    from unclip_lite.pipeline import UnCLIP
    root = make_icon_folder(tmp_path / "icons", n=160, seed=0)
    art = tmp_path / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "unclip_lite", "train", "all", "--preset", "smoke", "--data", str(root),
                           "--artifacts", str(art), "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("clip", "decoder", "prior_diffusion", "prior_ar", "upsampler"):
        assert read_json(art / stage / "config.json")["config"]["data"]["source"] == str(root.resolve()), stage
    assert not (art / "judge").exists()
    assert "val" in read_json(art / "prior_diffusion" / "metrics.json")["eval"]
    images = UnCLIP.from_artifacts(art).generate(["a teal house on white paper"], seed=0, progress=False, steps=2)
    assert images.shape == (1, 3, 64, 64)
    refused = subprocess.run([sys.executable, "-m", "unclip_lite", "train", "judge", "--preset", "smoke", "--data", str(root),
                              "--artifacts", str(art)], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "the judge needs ShapesWorld" in refused.stderr
