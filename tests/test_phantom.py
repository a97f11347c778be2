"""Tests for hpc_gan.data.phantom: seeded synthetic TOF-MRA head volumes and their NIfTI dataset."""

import math
import os

import nibabel as nib
import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from hpc_gan.data.phantom import Phantom, make_phantom, mip, write_phantom_dataset

SMALL = (48, 48, 24)
DEFAULT = (96, 96, 48)
SPACING = (0.5, 0.5, 0.8)


@pytest.fixture(scope="module")
def small() -> Phantom:
    return make_phantom(SMALL, seed=0)


@pytest.fixture(scope="module")
def default() -> Phantom:
    return make_phantom(DEFAULT, seed=0)


@pytest.mark.unit
def test_same_seed_gives_bit_identical_arrays():
    a, b = make_phantom(SMALL, seed=3), make_phantom(SMALL, seed=3)
    for name in ("image", "label", "mask", "affine"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


@pytest.mark.unit
def test_different_seeds_give_different_subjects(small):
    other = make_phantom(SMALL, seed=1)
    assert not np.array_equal(small.image, other.image)
    assert not np.array_equal(small.label, other.label)


@pytest.mark.unit
def test_dtypes_shapes_and_value_sets(small):
    assert small.image.dtype == np.float32 and small.image.shape == SMALL
    assert np.isfinite(small.image).all() and small.image.min() >= 0
    for arr in (small.label, small.mask):
        assert arr.dtype == np.uint8 and arr.shape == SMALL
        assert set(np.unique(arr)) <= {0, 1}
    assert small.affine.shape == (4, 4) and small.affine.dtype == np.float64


@pytest.mark.unit
def test_vessels_present_and_brighter_than_brain(small):
    vessel, brain = small.label == 1, (small.mask == 1) & (small.label == 0)
    assert vessel.sum() > 100
    assert small.image[vessel].mean() > 2 * small.image[brain].mean()


@pytest.mark.unit
def test_vessel_radii_taper_from_large_to_thin(default):
    depth = ndimage.distance_transform_edt(default.label)
    assert 2.0 <= depth.max() <= 6.0
    # Thin vessels: most label voxels sit on a vessel surface, not deep inside a big one.
    assert np.mean(depth[default.label == 1] <= 1.5) > 0.5


@pytest.mark.unit
def test_tube_rendering_is_partial_volume_and_spacing_aware():
    from hpc_gan.data.phantom import _render

    scale = np.array([1.0, 1.0, 2.0])    # spacing (0.5, 0.5, 1.0): slices twice as thick as pixels
    shape, r = (21, 21, 11), 2.1
    along_z = _render(shape, [(np.array([10.0, 10, 0]), np.array([10.0, 10, 20]), r, r)], scale)
    cross = along_z[:, :, 5]
    assert cross[10, 10] == 1.0
    assert np.count_nonzero(cross >= 0.5) == 13      # lattice points within 2.1 of the axis
    assert np.count_nonzero(cross) == 21             # ... and within 2.6 (partial volume)
    assert np.count_nonzero((cross > 0) & (cross < 1)) > 0
    along_x = _render(shape, [(np.array([0.0, 10, 10]), np.array([20.0, 10, 10]), r, r)], scale)
    # 5 voxels in-plane, plus one slice above and below, 2 q-units away.
    assert np.count_nonzero(along_x[10] >= 0.5) == 7


@pytest.mark.unit
def test_trees_are_connected_and_branching(default):
    components, n = ndimage.label(default.label, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    largest = components == 1 + np.argmax(sizes)
    assert sizes.max() > 0.5 * default.label.sum()
    # A branching tree spreads over the brain rather than being one long tube.
    brain_x, brain_y = np.nonzero(default.mask.any(axis=2))
    tree_x, tree_y = np.nonzero(largest.any(axis=2))
    assert np.ptp(tree_x) > 0.5 * np.ptp(brain_x) and np.ptp(tree_y) > 0.5 * np.ptp(brain_y)
    assert n >= 2  # scalp vessels are separate components


@pytest.mark.unit
@pytest.mark.parametrize("which, least_inside", [("small", 0.5), ("default", 0.7)])
def test_most_vessels_intracranial_some_extracranial(which, least_inside, request):
    ph = request.getfixturevalue(which)
    vessel = ph.label == 1
    inside = np.count_nonzero(vessel & (ph.mask == 1)) / np.count_nonzero(vessel)
    assert least_inside < inside < 1.0


@pytest.mark.unit
def test_rim_brighter_than_brain_and_air_dark(small):
    outside = (small.mask == 0) & (small.label == 0)
    # Air is pure Rician noise (sigma 0.025), essentially never above 0.1; the rim always is.
    rim, air = outside & (small.image > 0.1), outside & (small.image <= 0.1)
    brain = (small.mask == 1) & (small.label == 0)
    assert rim.sum() > 0.05 * rim.size and air.sum() > 0.05 * air.size
    assert small.image[rim].mean() > 1.2 * small.image[brain].mean()
    assert small.image[air].mean() < 0.06
    corners = small.image[[0, 0, -1, -1], [0, -1, 0, -1], :]
    assert corners.mean() < 0.06


@pytest.mark.unit
def test_affine_is_ras_with_requested_spacing():
    spacing = (0.4, 0.6, 1.2)
    ph = make_phantom(SMALL, spacing=spacing, seed=0)
    assert np.allclose(nib.affines.voxel_sizes(ph.affine), spacing)
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    centre = ph.affine @ np.array([*((np.array(SMALL) - 1) / 2), 1.0])
    assert np.allclose(centre[:3], 0.0)


@pytest.mark.unit
def test_mip_projects_along_axis(small):
    assert mip(small.image).shape == SMALL[:2]
    assert mip(small.label, axis=0).shape == SMALL[1:]
    assert np.array_equal(mip(small.image), small.image.max(axis=2))
    with pytest.raises(ValueError, match="3-D"):
        mip(small.image[..., 0])


@pytest.mark.unit
def test_write_dataset_round_trips_through_nibabel(tmp_path):
    spacing = (0.5, 0.5, 1.0)
    ids = write_phantom_dataset(tmp_path, 2, shape=SMALL, spacing=spacing, seed=7)
    assert ids == ["sub-000", "sub-001"]
    for i, sid in enumerate(ids):
        expected = make_phantom(SMALL, spacing, seed=np.random.SeedSequence([7, i]))
        roles = (("images", "image", np.float32), ("labels", "label", np.uint8),
                 ("masks", "mask", np.uint8))
        for folder, attr, dtype in roles:
            img = nib.load(tmp_path / folder / f"{sid}.nii.gz")
            assert img.get_data_dtype() == dtype
            assert np.array_equal(np.asanyarray(img.dataobj), getattr(expected, attr))
            assert np.allclose(img.affine, expected.affine)
            assert img.header.get_zooms() == pytest.approx(spacing)
            assert img.header.get_xyzt_units()[0] == "mm"
    leftovers = [n for _, _, names in os.walk(tmp_path) for n in names if n.endswith(".part")]
    assert not leftovers
    png = tmp_path / "mip_sub-000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(png).ndim == 3
    assert not (tmp_path / "mip_sub-001.png").exists()


@pytest.mark.unit
def test_write_refuses_existing_dataset_unless_overwrite(tmp_path):
    write_phantom_dataset(tmp_path, 2, shape=SMALL, mip_png=False)
    with pytest.raises(ValueError, match="overwrite=True") as err:
        write_phantom_dataset(tmp_path, 1, shape=SMALL, mip_png=False)
    assert str(tmp_path / "images") in str(err.value)
    ids = write_phantom_dataset(tmp_path, 1, shape=SMALL, mip_png=False, overwrite=True)
    assert ids == ["sub-000"]
    for folder in ("images", "labels", "masks"):  # the stale second subject is gone everywhere
        assert sorted(os.listdir(tmp_path / folder)) == ["sub-000.nii.gz"]


@pytest.mark.unit
def test_workers_write_the_same_bytes_as_one_process(tmp_path):
    write_phantom_dataset(tmp_path / "one", 2, shape=(32, 32, 16), mip_png=False)
    write_phantom_dataset(tmp_path / "two", 2, shape=(32, 32, 16), mip_png=False, workers=2)
    for folder in ("images", "labels", "masks"):
        for sid in ("sub-000", "sub-001"):
            one = (tmp_path / "one" / folder / f"{sid}.nii.gz").read_bytes()
            assert one == (tmp_path / "two" / folder / f"{sid}.nii.gz").read_bytes()


@pytest.mark.unit
@pytest.mark.parametrize("shape", [(48, 48), (48, 48, 24, 2), (48, 48, 8), (48.0, 48, 24),
                                   (True, 48, 48), "abc", None])
def test_bad_shape_raises_naming_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape)


@pytest.mark.unit
@pytest.mark.parametrize("spacing", [(0.5, 0.5), (0.5, 0.0, 0.8), (0.5, -1.0, 0.8),
                                     (0.5, math.nan, 0.8), (0.5, math.inf, 0.8), ("a", 0.5, 0.8),
                                     None])
def test_bad_spacing_raises_naming_spacing(spacing):
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(SMALL, spacing=spacing)


@pytest.mark.unit
@pytest.mark.parametrize("kwargs, name", [({"n_subjects": 0}, "n_subjects"),
                                          ({"workers": 0}, "workers"), ({"seed": -1}, "seed"),
                                          ({"shape": (8, 8, 8)}, "shape")])
def test_write_dataset_rejects_bad_arguments(tmp_path, kwargs, name):
    args = {"n_subjects": 1, "shape": SMALL, **kwargs}
    with pytest.raises(ValueError, match=name):
        write_phantom_dataset(tmp_path, **args)
    assert not (tmp_path / "images").exists()
