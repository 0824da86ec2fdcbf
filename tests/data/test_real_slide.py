"""Integration: a real H&E slide region -> tiles -> colour features -> TRIDENT h5 -> store -> read back."""
import h5py
import numpy as np
import torch

from fastmil.cli import main
from fastmil.data import ingest, open_store
from fastmil.data.tiling import COLOUR_FEATURE_DIM, colour_features, tissue_fraction
from tests.tolerance import check_close, worst_case_bound


def test_tissue_filter_separates_background_from_stain():
    white = np.full((32, 32, 3), 245, np.uint8)
    stain = np.zeros((32, 32, 3), np.uint8)
    stain[...] = (180, 90, 160)  # eosin/haematoxylin-ish pink-purple
    assert tissue_fraction(white) == 0.0 and tissue_fraction(stain) == 1.0
    f = colour_features(stain)
    assert f.shape == (COLOUR_FEATURE_DIM,)
    # the mean colour: /255 in fp32, a sum over the tile's 32 x 32 pixels, the division by their count. The 1024
    # terms are identical, so their roundings are correlated, not independent: the worst case K u of a length-K
    # sum applies (worst_case_bound), not the sqrt(K) model
    depth = 1 + 32 * 32 + 1
    check_close(torch.from_numpy(f[:3]), torch.tensor([180.0, 90.0, 160.0], dtype=torch.float64) / 255,
                worst_case_bound(depth), "data", "mean colour of a tile")


def test_real_slide_tile_ingest_read_back(tmp_path, cmu_slide):
    h5 = tmp_path / "trident" / "CMU-1-Small-Region.h5"
    assert main(["tile", str(cmu_slide), str(h5), "-q"]) == 0
    with h5py.File(h5) as fh:
        feats, coords = fh["features"][:], fh["coords"][:]
        assert fh["features"].chunks == (1, COLOUR_FEATURE_DIM)
        assert fh["coords"].attrs["patch_size_level0"] == 224
        assert fh["coords"].attrs["target_magnification"] == 20.0  # AppMag = 20 in the slide's metadata
    # 2220 x 2967 px region: 9 x 13 = 117 full tiles, most of them tissue
    assert 40 <= len(feats) <= 117 and np.isfinite(feats).all()
    assert (coords % 224 == 0).all() and len(np.unique(coords, axis=0)) == len(coords)
    ingest(h5.parent, tmp_path / "store", progress=False)
    store = open_store(tmp_path / "store")
    f, c = store.read("CMU-1-Small-Region")
    assert f.tobytes() == feats.tobytes() and np.array_equal(c, coords)
    assert store.slide_attrs("CMU-1-Small-Region")["encoder"] == "colour-stats-v1"
    # features carry real image content: tiles differ from each other
    assert f.std(axis=0)[:3].min() > 0.005


def test_slide_without_objective_power_is_recorded_as_unknown(tmp_path):
    """A plain TIFF has no objective power: tiling warns and records no magnification (it used to claim 20x)."""
    import pytest
    import tifffile

    rng = np.random.default_rng(0)
    image = np.full((448, 448, 3), 245, np.uint8)
    image[:224, :224] = rng.integers(60, 200, size=(224, 224, 3), dtype=np.uint8)  # one tile of "tissue"
    tifffile.imwrite(tmp_path / "plain.tif", image, photometric="rgb")
    with pytest.warns(UserWarning, match="no objective power.*unknown"):
        assert main(["tile", str(tmp_path / "plain.tif"), str(tmp_path / "h5" / "plain.h5"), "-q"]) == 0
    with h5py.File(tmp_path / "h5" / "plain.h5") as fh:
        assert "target_magnification" not in fh["coords"].attrs and "level0_magnification" not in fh["coords"].attrs
    ingest(tmp_path / "h5", tmp_path / "store", progress=False)
    assert "magnification" not in open_store(tmp_path / "store").slide_attrs("plain")


def test_overlay_geojson_and_top_k_crops_on_the_real_slide(tmp_path, cmu_slide):
    """Attention that rises from left to right, drawn over the real slide's thumbnail; the GeoJSON holds one closed
    square per patch with its attention; the top-k crops are the slide's pixels at the listed coordinates."""
    import json

    from matplotlib.image import imread
    from PIL import Image

    from fastmil.train.slide_outputs import find_slide_file, save_slide_overlay, write_geojson, write_top_k

    h5 = tmp_path / "CMU-1-Small-Region.h5"
    assert main(["tile", str(cmu_slide), str(h5), "-q"]) == 0
    with h5py.File(h5) as fh:
        coords = fh["coords"][:]
    attention = (coords[:, 0] + 1.0) / (coords[:, 0] + 1.0).sum()  # rises with x
    assert find_slide_file(cmu_slide.parent, "CMU-1-Small-Region") == cmu_slide
    png = tmp_path / "overlay.png"
    save_slide_overlay(png, cmu_slide, "CMU-1-Small-Region", coords, 224, attention)
    img = imread(png)[..., :3]
    left, right = img[:, : img.shape[1] // 2], img[:, img.shape[1] // 2 :]
    assert not np.allclose(left, right, atol=0.05)  # the right panel carries the overlay
    geo = tmp_path / "slide.geojson"
    write_geojson(geo, "CMU-1-Small-Region", coords, 224, attention)
    doc = json.loads(geo.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(coords)
    for feature, (x, y), a in zip(doc["features"], coords.tolist(), attention.tolist()):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] == [x, y] and ring[2] == [x + 224, y + 224] and len(ring) == 5
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["measurements"]["attention"] == a
    ranks = sorted(f["properties"]["measurements"]["attention_rank"] for f in doc["features"])
    assert ranks == list(range(1, len(coords) + 1))
    top = write_top_k(tmp_path / "top_k", "CMU-1-Small-Region", coords, 224, attention, 5, cmu_slide)
    assert top == np.argsort(-attention, kind="stable")[:5].tolist()
    assert all(coords[i][0] == coords[:, 0].max() for i in top[:1])
    rows = (tmp_path / "top_k" / "CMU-1-Small-Region.csv").read_text().splitlines()
    assert rows[0] == "rank,index,x,y,attention" and len(rows) == 6
    import tiffslide

    with tiffslide.TiffSlide(str(cmu_slide)) as slide:
        x, y = coords[top[0]]
        want = np.asarray(slide.read_region((int(x), int(y)), 0, (224, 224), as_array=True))[..., :3]
    crop = np.asarray(Image.open(tmp_path / "top_k" / "CMU-1-Small-Region" / "rank_001.png"))
    assert crop.shape == (224, 224, 3) and np.array_equal(crop, want)
