"""Integration: a real H&E slide region -> tiles -> colour features -> TRIDENT h5 -> store -> read back."""
import h5py
import numpy as np

from fastmil.cli import main
from fastmil.data import ingest, open_store
from fastmil.data.tiling import COLOUR_FEATURE_DIM, colour_features, tissue_fraction


def test_tissue_filter_separates_background_from_stain():
    white = np.full((32, 32, 3), 245, np.uint8)
    stain = np.zeros((32, 32, 3), np.uint8)
    stain[...] = (180, 90, 160)  # eosin/haematoxylin-ish pink-purple
    assert tissue_fraction(white) == 0.0 and tissue_fraction(stain) == 1.0
    f = colour_features(stain)
    assert f.shape == (COLOUR_FEATURE_DIM,) and np.allclose(f[:3], np.array([180, 90, 160]) / 255, atol=1e-6)


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
