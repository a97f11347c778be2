"""Seeded synthetic TOF-MRA head phantoms: the default dataset, as patient scans cannot be shipped.

Geometry is built in "q-units", voxel index * spacing / in-plane voxel size, so distances are
isotropic and a radius of 1 is one in-plane voxel whatever the slice thickness. The head is scaled
to fill the field of view; vessel radii are in voxels and do not scale with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
from collections import deque
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from scipy import ndimage

from hpc_gan.data.nifti import save_nifti
from hpc_gan.plots import save_axial_mip_png

log = logging.getLogger(__name__)

DEFAULT_SHAPE = (96, 96, 48)
DEFAULT_SPACING = (0.5, 0.5, 0.8)
MIN_SIZE = 16
R_MIN = 0.5                # thinnest vessel radius grown, in in-plane voxels
NOISE_SIGMA = 0.025        # Rician noise relative to the intracranial vessel signal of 1.0
AIR, SCALP, SKULL, BRAIN = range(4)
# Signal per tissue class (indexed as above) and the strength of its texture.
CLASS_SIGNAL = np.array([0.0, 0.55, 0.22, 0.30], dtype=np.float32)
CLASS_TEXTURE = np.array([0.0, 0.15, 0.20, 0.12], dtype=np.float32)
VESSEL_SIGNAL, SCALP_VESSEL_SIGNAL = 1.0, 0.9
SUBDIRS = ("images", "labels", "masks")


@dataclass
class Phantom:
    """One synthetic subject; arrays are (X, Y, Z) in NIfTI voxel order, axis 2 axial.

    Attributes:
        image: float32 TOF-MRA-like intensities, about 0 (air) to 1.1 (vessels), e.g. (96, 96, 48).
        label: uint8 vessel label in {0, 1}, same shape, intra- and extracranial vessels.
        mask: uint8 brain mask in {0, 1}, same shape.
        affine: (4, 4) float64 voxel-to-RAS (mm) matrix, centred on the volume.
    """

    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class _Head:
    """Brain ellipsoid with a low-frequency wobbly surface in a skull and scalp shell (q-units)."""

    center: np.ndarray
    axes: np.ndarray       # brain semi-axes
    rim: float             # skull + scalp thickness
    freqs: np.ndarray      # (M, 3) surface wobble frequencies
    phases: np.ndarray
    amps: np.ndarray

    def wobble(self, dx, dy, dz):
        """Radial scale of the surface along direction (dx, dy, dz); depends on direction only."""
        inv_norm = 1.0 / (np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6)
        out = 1.0
        # Python-float coefficients keep float32 slices in float32 (numpy scalars would upcast).
        waves = zip(self.freqs.tolist(), self.phases.tolist(), self.amps.tolist())
        for (fx, fy, fz), phase, amp in waves:
            out = out + amp * np.cos((fx * dx + fy * dy + fz * dz) * inv_norm + phase)
        return out

    def level(self, dx, dy, dz, grow=0.0, wobble=None):
        """Below 1 inside the shell with semi-axes ``axes + grow``; grows linearly with distance."""
        ax, ay, az = (self.axes + grow).tolist()
        rn = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2)
        return rn / (self.wobble(dx, dy, dz) if wobble is None else wobble)

    def shell_point(self, theta, z, grow):
        """Point at azimuth theta, height z on the shell grown by ``grow``; None past its poles."""
        ax, ay, az = self.axes + grow
        zn = (z - self.center[2]) / az
        if abs(zn) >= 0.97:
            return None
        rho = math.sqrt(1.0 - zn * zn)
        d = np.array([ax * rho * math.cos(theta), ay * rho * math.sin(theta), z - self.center[2]])
        return self.center + d * self.wobble(*d)


def _check_geometry(shape, spacing) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validated (shape, spacing); bools are rejected although Python counts them as ints."""
    checks = (("shape", shape, f"3 ints, each >= {MIN_SIZE}",
               lambda v: isinstance(v, Integral) and v >= MIN_SIZE),
              ("spacing", spacing, "3 positive finite floats (mm)",
               lambda v: isinstance(v, Real) and math.isfinite(v) and v > 0))
    for name, value, what, ok in checks:
        vals = tuple(value) if isinstance(value, (tuple, list, np.ndarray)) else ()
        if len(vals) != 3 or not all(not isinstance(v, bool) and ok(v) for v in vals):
            raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(int(v) for v in shape), tuple(float(v) for v in spacing)


def _check_int(name: str, value, least: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (math.sqrt(float(v @ v)) + 1e-12)


def _make_head(rng: np.random.Generator, shape, scale: np.ndarray) -> _Head:
    extent = np.asarray(shape) * scale
    rim = max(0.07 * min(extent[0], extent[1]), 3.0)
    # The axial slab cuts through the head: the brain runs past the bottom slice (so the carotids
    # enter from below inside it) and far above the top one, like a Circle-of-Willis TOF slab.
    center = (np.asarray(shape) - 1) * scale / 2
    center[2] = 0.45 * extent[2]
    axes = np.array([0.43 * extent[0] - rim, 0.43 * extent[1] - rim, 1.6 * extent[2]])
    n = 5                                         # a few low-frequency surface waves
    freqs = np.array([_unit(v) for v in rng.standard_normal((n, 3))])
    freqs *= rng.uniform(1.5, 3.5, (n, 1))
    phases, amps = rng.uniform(0, 2 * np.pi, n), rng.uniform(0.006, 0.012, n)
    return _Head(center, axes, rim, freqs, phases, amps)


def _tissue_classes(head: _Head, shape, scale: np.ndarray) -> np.ndarray:
    """uint8 map of AIR / SCALP / SKULL / BRAIN, computed slice by slice to keep memory flat."""
    dx = (np.arange(shape[0]) * scale[0] - head.center[0]).astype(np.float32)[:, None]
    dy = (np.arange(shape[1]) * scale[1] - head.center[1]).astype(np.float32)[None, :]
    classes = np.zeros(shape, dtype=np.uint8)
    for k in range(shape[2]):
        dz = float(k * scale[2] - head.center[2])
        wob = head.wobble(dx, dy, dz)
        # Nested shells (same wobble, growing axes): the count of shells we are inside is the class.
        for grow in (head.rim, 0.25 * head.rim, 0.0):
            classes[:, :, k] += head.level(dx, dy, dz, grow, wob) < 1.0
    return classes


class _ArterialTrees:
    """Grows intracranial arterial trees as tapered segments (q0, q1, r0, r1) in q-units."""

    TORTUOSITY = 0.09      # turning per q-unit of the smooth random walk
    PULL = 0.03            # per q-unit pull back towards the branch's preferred direction
    MAX_GENERATION = 6

    def __init__(self, rng: np.random.Generator, head: _Head, top: float):
        self.rng, self.head, self.top = rng, head, top
        self.size = float(head.axes[:2].mean())
        self.taper = 2.0 * self.size              # radius e-folding length along a branch
        self.budget = int(10 + 2 * self.size)     # branches left to grow; bounds runtime, density
        self.segments: list[tuple] = []
        self.pending: deque = deque()

    def depth(self, p: np.ndarray) -> float:
        """Lower bound of the distance from p to the brain surface (ellipsoid level-set spacing)."""
        return (1.0 - self.head.level(*(p - self.head.center))) * 0.9 * float(self.head.axes.min())

    def walk(self, pos, d, pref, r, gen, length=math.inf, branch=True):
        """Smooth random walk from pos, branching on the way; returns the end (pos, d, r)."""
        w = np.zeros(3)
        travelled, next_branch = 0.0, self._gap(r)
        while r >= R_MIN and travelled < length:
            step = min(max(r, 1.0), 3.0)
            # AR(1) turning keeps the path smooth yet tortuous; only the part across d turns it.
            w = 0.8 * w + 0.6 * self.rng.standard_normal(3)
            w -= (w @ d) * d
            d = _unit(d + self.TORTUOSITY * step * w + self.PULL * step * (pref - d))
            moved = self._advance(pos, d, step, r)
            if moved is None:
                break
            new, d = moved
            r_new = r * math.exp(-step / self.taper)
            self.segments.append((pos, new, r, r_new))
            pos, r, travelled = new, r_new, travelled + step
            if branch and travelled >= next_branch and gen < self.MAX_GENERATION:
                r = self._spawn(pos, d, r, gen)
                next_branch = travelled + self._gap(r)
        return pos, d, r

    def grow_pending(self) -> None:
        # Breadth first, so the branch budget is shared by all trees and generations.
        while self.pending and self.budget > 0:
            self.budget -= 1
            self.walk(*self.pending.popleft())

    def arc(self, p, q, bulge, r) -> None:
        """Quadratic Bezier vessel of constant radius from p to q (a communicating artery)."""
        ctrl = (p + q) / 2 + bulge
        t = np.linspace(0.0, 1.0, max(2, int(np.linalg.norm(q - p) / 2)) + 1)[:, None]
        pts = (1 - t) ** 2 * p + 2 * (1 - t) * t * ctrl + t ** 2 * q
        self.segments += [(a, b, r, r) for a, b in zip(pts[:-1], pts[1:])]

    def _advance(self, pos, d, step, r):
        for _ in range(4):
            new = pos + step * d
            if new[2] > self.top:
                return None                       # the vessel leaves the slab upwards
            if new[2] < 0.0:                      # keep trees in the slab: turn back up
                d = _unit(d * np.array([1.0, 1.0, -1.0]))
            elif self.depth(new) > r + 1.5:
                return new, d
            else:                                 # too close to the brain surface: steer inwards
                d = _unit(d - 0.8 * _unit((pos - self.head.center) / self.head.axes ** 2))
        return None

    def _gap(self, r: float) -> float:
        return self.rng.uniform(0.6, 1.4) * (0.08 * self.size + 3.0 * r)

    def _spawn(self, pos, d, r, gen) -> float:
        """Queues a side branch at pos and returns the parent's remaining radius."""
        rc = r * self.rng.uniform(0.5, 0.85)
        if rc < R_MIN + 0.1:
            return r                              # too thin to see: spend no branch budget on it
        perp = _unit(np.cross(d, self.rng.standard_normal(3)))
        angle = self.rng.uniform(0.5, 1.2)
        child = _unit(math.cos(angle) * d + math.sin(angle) * perp)
        outward = _unit((pos - self.head.center) * np.array([1.0, 1.0, 0.0]))
        # Children drift towards the cortex, as the pial arteries do.
        self.pending.append((pos, child, _unit(child + 0.6 * outward), rc, gen + 1))
        # Murray's law (the parent keeps the rest of the flow), softened so that trees stay visible
        # for several generations before reaching the TOF resolution limit.
        return max((r ** 3 - rc ** 3) ** (1 / 3), 0.85 * r)


def _intracranial_vessels(rng: np.random.Generator, head: _Head, top: float) -> list[tuple]:
    """Carotids (and usually the basilar) rising from below, a Circle of Willis, then trees."""
    trees = _ArterialTrees(rng, head, top)
    a, b = head.axes[:2]
    r_root = float(np.clip(0.11 * min(a, b), 1.0, 4.0))
    up = np.array([0.0, 0.0, 1.0])
    roots = [(-0.25, 0.1, r_root), (0.25, 0.1, r_root)]
    if rng.random() < 0.75:
        roots.append((0.0, -0.12, 0.8 * r_root))
    ends = []
    for fx, fy, r in roots:
        start = head.center + np.array([fx * a, fy * b, 0.0]) + rng.normal(0.0, 0.03 * a, 3)
        start[2] = 0.0
        pos, _, r_end = trees.walk(start, up, up, r * rng.uniform(0.9, 1.05), 0,
                                   length=rng.uniform(0.2, 0.3) * top, branch=False)
        ends.append(pos)
        # ICA -> MCA (lateral) + ACA (anterior, up); basilar -> two PCAs (posterior, lateral).
        side = math.copysign(1.0, fx)
        prefs = [((side, 0.1, 0.15), 0.8), ((-0.2 * side, 1.0, 0.5), 0.6)] if fx else \
                [((-1.0, -0.7, 0.2), 0.7), ((1.0, -0.7, 0.2), 0.7)]
        for pref, frac in prefs:
            pref = _unit(np.array(pref))
            trees.pending.append((pos, pref, pref, r_end * frac, 1))
    r_com = max(0.8, 0.3 * r_root)
    span = float(np.linalg.norm(ends[1] - ends[0]))
    # Communicating arteries close the Circle of Willis: anterior, then the two posterior ones.
    trees.arc(ends[0], ends[1], np.array([0.0, 0.35 * span, 0.0]), r_com)
    for ica in ends[:2] if len(ends) == 3 else ():
        trees.arc(ica, ends[2], np.array([0.15 * (ica[0] - ends[2][0]), 0.0, 0.0]), r_com)
    trees.grow_pending()
    return trees.segments


def _scalp_vessels(rng: np.random.Generator, head: _Head, top: float) -> list[tuple]:
    """A few superficial arteries winding up through the scalp, outside the brain mask."""
    segments = []
    size = float(head.axes[:2].mean())
    for _ in range(int(rng.integers(2, 5))):
        theta, dtheta, z, prev = rng.uniform(0, 2 * np.pi), 0.0, 0.0, None
        r = min(1.0, 0.25 * head.rim)
        while z <= top:
            p = head.shell_point(theta, z, grow=0.65 * head.rim)
            if p is None:
                break
            if prev is not None:
                segments.append((prev, p, r, r * 0.995))
                r *= 0.995
            prev = p
            dtheta = 0.85 * dtheta + rng.normal(0.0, 0.5 / size)
            theta, z = theta + dtheta, z + 1.5
    return segments


def _render(shape, segments, scale: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy clip(r - d + 0.5, 0, 1), max-composited, each segment in its box."""
    occ = np.zeros(shape, dtype=np.float32)
    upper = np.asarray(shape)
    for q0, q1, r0, r1 in segments:
        pad = max(r0, r1) + 0.5                   # occupancy is 0 beyond r + 0.5
        lo = np.maximum(np.floor((np.minimum(q0, q1) - pad) / scale).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(q0, q1) + pad) / scale).astype(int) + 1, upper)
        if np.any(hi <= lo):
            continue
        # Voxel-centre offsets from q0 in q-units, float32 and broadcastable over the box.
        gx, gy, gz = (np.arange(lo[i], hi[i], dtype=np.float32) * np.float32(scale[i])
                      - np.float32(q0[i]) for i in range(3))
        gx, gy, gz = gx[:, None, None], gy[None, :, None], gz[None, None, :]
        sx, sy, sz = (q1 - q0).tolist()
        t = (gx * sx + gy * sy + gz * sz) / max(sx * sx + sy * sy + sz * sz, 1e-12)
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((gx - t * sx) ** 2 + (gy - t * sy) ** 2 + (gz - t * sz) ** 2)
        view = occ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(view, np.clip(float(r0) + t * float(r1 - r0) - dist + 0.5, 0.0, 1.0), out=view)
    return occ


def _bias_field(rng: np.random.Generator, shape) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field: separable quadratic in log space, ~0.75-1.3."""
    log_b = np.zeros((1, 1, 1), dtype=np.float32)
    for axis, n in enumerate(shape):
        u = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        c1, c2 = rng.normal(0.0, 0.12, 2).tolist()
        log_b = log_b + (c1 * u + c2 * u * u).reshape([-1 if i == axis else 1 for i in range(3)])
    return np.exp(log_b)


def _compose(rng: np.random.Generator, classes, occ, scale) -> np.ndarray:
    """Tissue with texture, bright inflow vessels blended by occupancy, bias field, Rician noise."""
    noise = rng.standard_normal(classes.shape, dtype=np.float32)
    texture = ndimage.gaussian_filter(noise, sigma=[4.0 / s for s in scale])   # ~4 voxel blobs
    texture /= texture.std() + 1e-12
    tissue = CLASS_SIGNAL[classes] * (1.0 + CLASS_TEXTURE[classes] * texture)
    vessel = np.where(classes == BRAIN, np.float32(VESSEL_SIGNAL), np.float32(SCALP_VESSEL_SIGNAL))
    signal = (tissue + occ * (vessel - tissue)) * _bias_field(rng, classes.shape)
    n1, n2 = (rng.standard_normal(classes.shape, dtype=np.float32) * np.float32(NOISE_SIGMA)
              for _ in range(2))
    return np.sqrt((signal + n1) ** 2 + n2 ** 2)


def make_phantom(shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed=0) -> Phantom:
    """Builds one seeded synthetic TOF-MRA subject.

    Args:
        shape: volume size (X, Y, Z), 3 ints each >= 16; the paper's scans are (312, 384, 127).
        spacing: voxel size in mm (x, y, z), 3 positive floats; TOF-MRA-like anisotropic default.
        seed: int or ``np.random.SeedSequence``; the same seed gives bit-identical arrays.

    Returns:
        Phantom with ``image`` float32, ``label`` and ``mask`` uint8 of ``shape`` and a 4x4 RAS
        affine, e.g. ``make_phantom((96, 96, 48)).image.shape == (96, 96, 48)``.

    Raises:
        ValueError: ``shape`` or ``spacing`` is malformed (the message names which).
    """
    shape, spacing = _check_geometry(shape, spacing)
    rng = np.random.default_rng(seed)
    scale = np.asarray(spacing) / math.sqrt(spacing[0] * spacing[1])
    head = _make_head(rng, shape, scale)
    classes = _tissue_classes(head, shape, scale)
    top = (shape[2] - 1) * scale[2]
    inside = _render(shape, _intracranial_vessels(rng, head, top), scale)
    inside *= classes == BRAIN                    # guarantees intracranial vessels stay in the mask
    scalp = _render(shape, _scalp_vessels(rng, head, top), scale)
    scalp *= (classes == SCALP) | (classes == SKULL)
    occ = np.maximum(inside, scalp)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)   # RAS, centred on volume
    return Phantom(image=_compose(rng, classes, occ, scale), label=(occ >= 0.5).astype(np.uint8),
                   mask=(classes == BRAIN).astype(np.uint8), affine=affine)


def mip(volume: np.ndarray, axis: int = 2) -> np.ndarray:
    """Maximum-intensity projection; axis 2 gives the axial MIP, e.g. (96, 96, 48) -> (96, 96).

    Raises:
        ValueError: ``volume`` is not 3-D.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D, got shape {volume.shape}")
    return volume.max(axis=axis)


def write_phantom_dataset(out_dir, n_subjects, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed=0,
                          workers=1, mip_png=True, overwrite=False) -> list[str]:
    """Writes phantoms as ``out_dir/{images,labels,masks}/sub-000.nii.gz``, ``sub-001`` ...

    Subject i uses ``np.random.SeedSequence([seed, i])``, so the files are byte-identical whatever
    ``workers`` is. The three folders are built in a staging directory beside ``out_dir`` and
    moved in only when every subject is written (:func:`hpc_gan.io.staged_directory`): a run
    that fails (or is interrupted) leaves ``out_dir`` as it was. ``workers > 1`` spawns
    processes, so a calling script needs an ``if __name__ == "__main__":`` guard.

    Args:
        out_dir: output directory, created if needed.
        n_subjects: number of subjects, >= 1.
        shape, spacing: as for :func:`make_phantom`, e.g. (96, 96, 48) and (0.5, 0.5, 0.8) mm.
        seed: non-negative int.
        workers: processes to use, >= 1.
        mip_png: also write ``out_dir/mip_sub-000.png``, axial image MIP beside label MIP.
        overwrite: replace an existing dataset: its ``images/``, ``labels/``, ``masks/`` and
            ``mip_*.png`` (other files in ``out_dir`` are kept).

    Returns:
        The subject ids, e.g. ``['sub-000', 'sub-001']`` for ``n_subjects=2``.

    Raises:
        ValueError: a malformed argument (named in the message), or one of ``out_dir``'s
            ``images/``, ``labels/``, ``masks/`` already holds files and ``overwrite`` is False.
        OutputError: ``out_dir`` is a file, lies under one or is not writable, or the disk
            filled up (``out_dir`` is then left as it was).
    """
    from hpc_gan.io import check_output_path, staged_directory, write_error

    shape, spacing = _check_geometry(shape, spacing)
    n_subjects, workers = _check_int("n_subjects", n_subjects, 1), _check_int("workers", workers, 1)
    seed = _check_int("seed", seed, 0)
    out_dir = os.fspath(check_output_path(out_dir, "--out"))
    existing = [os.path.join(sub, n) for sub in SUBDIRS if os.path.isdir(os.path.join(out_dir, sub))
                for n in os.listdir(os.path.join(out_dir, sub))]
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds {len(existing)} file(s) in {', '.join(SUBDIRS)} (e.g. "
                         f"{os.path.join(out_dir, existing[0])}); pass overwrite=True (--overwrite) to replace them")
    ids = ["sub-%03d" % i for i in range(n_subjects)]
    try:
        with staged_directory(out_dir, owned=lambda name: name in SUBDIRS or name.startswith("mip_")) as stage:
            for sub in SUBDIRS:
                os.makedirs(os.path.join(stage, sub))
            jobs = [(os.fspath(stage), sid, i, shape, spacing, seed, mip_png and i == 0)
                    for i, sid in enumerate(ids)]
            # spawn, not fork: forking a process that holds threads (torch, BLAS) can deadlock.
            pool = multiprocessing.get_context("spawn").Pool(min(workers, n_subjects)) if workers > 1 \
                else None
            with pool or contextlib.nullcontext():
                for sid in (pool.imap_unordered if pool else map)(_write_subject, jobs):
                    log.info("wrote phantom %s", sid)
    except OSError as exc:
        raise write_error(exc, f"phantoms into '{out_dir}' (nothing there changed)") from None
    return ids


def _write_subject(job) -> str:
    out_dir, sid, index, shape, spacing, seed, want_png = job
    ph = make_phantom(shape, spacing, np.random.SeedSequence([seed, index]))
    for sub, array in (("labels", ph.label), ("masks", ph.mask), ("images", ph.image)):
        path = os.path.join(out_dir, sub, sid + ".nii.gz")
        save_nifti(array, ph.affine, path, is_label=sub != "images")
    if want_png:
        save_axial_mip_png(ph.image, ph.label, spacing, os.path.join(out_dir, f"mip_{sid}.png"))
    return sid
