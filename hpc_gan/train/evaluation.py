"""Evaluation during training: the generator on a fixed latent set against cached real statistics.

Every ``train.eval_every`` steps and at the last step, :class:`TrainingEvaluation` measures the
generator the loop hands it (:meth:`hpc_gan.train.trainer.TrainingLoop.evaluation_module`) with
the evaluator's own functions (:mod:`hpc_gan.eval.evaluate`, :mod:`hpc_gan.eval.features`):

* generated set: ``train.eval_samples`` = N patches from the fixed latents of
  :func:`hpc_gan.sample.fixed_latents` with seed :data:`EVAL_SEED` (sample i's latent depends on
  i alone: the same in every run, after every resume and on any number of ranks; they are the
  first N patches ``hpc_gan sample --seed 0`` would write). Rank r generates indices r, r + W, ...
* real set: min(N, #patches) training patches drawn with :data:`EVAL_SEED`; their features and
  FID statistics are computed once and cached in ``<run_dir>/eval_cache/``
  (:func:`hpc_gan.eval.evaluate.embed_real`); a resumed run reads them back.
* figures: FID from all-reduced sufficient statistics, precision / recall / density / coverage
  (k = :data:`NN_K`) on gathered features, the KS statistic between real and generated
  per-patch vessel fractions, and the label contrast of the generated pairs beside that of the
  real ones: :func:`hpc_gan.eval.agreement.label_contrast` of the whole set, i.e. the mean of
  the gathered :func:`~hpc_gan.eval.agreement.per_patch_contrast` over patches that have both
  vessel and background voxels. With ``train.eval_segmenter`` also the segmenter DSC
  (:func:`hpc_gan.eval.agreement.per_patch_dice`, mean over patches) of a reference segmenter
  trained on the real training split at the first evaluation (rank 0 trains and caches it in
  ``eval_cache/``, the other ranks then read it), beside the same DSC on the real patches.

Every rank computes its share; rank 0 computes the figures and broadcasts them, so every rank
returns the same dict and takes the same checkpoint decision. Under ZeRO-3 every rank runs the
same number of generator forward passes (parameter gathering is collective).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from hpc_gan.config import RunConfig
from hpc_gan.data.dataset import RankShare
from hpc_gan.eval.evaluate import embed, embed_real, pick
from hpc_gan.eval.features import gather_features
from hpc_gan.eval.nn_metrics import DEFAULT_K
from hpc_gan.train import checkpoint as ckpt

log = logging.getLogger(__name__)
EVAL_SEED = 0       # latents, real subset, random extractor and MedicalNet noise: fixed across runs
NN_K = DEFAULT_K    # neighbour of the precision/recall balls (5), as the evaluator's
CACHE_DIR = "eval_cache"
FIGURES = ("fid", "precision", "recall", "density", "coverage", "vessel_fraction_ks", "contrast", "contrast_real",
           "dice", "dice_real")


class TrainingEvaluation:
    """The in-training evaluator of one run and the best FID so far (collective calls).

    Args:
        cfg: the run's config (``train.eval_samples``, ``train.eval_weights``, ``train.batch_size``,
            ``model.label_threshold``, ``data.split``).
        dataset: the training patches (2, X, Y, Z), label channel {0, 1}.
        rank, world_size: this rank and the number of ranks.
        run_dir: where ``eval_cache/`` and ``checkpoints/best`` are.
        device: where the generator and the extractor run.

    Example:
        >>> evaluation = TrainingEvaluation(cfg, trainer.dataset, 0, 1, cfg.run_dir, "cpu")
        >>> result = evaluation.run(generator)        # {"fid": ..., "precision": ..., ..., "seconds": ...}
        >>> evaluation.improves(result)               # True the first time
    """

    def __init__(self, cfg: RunConfig, dataset: Dataset, rank: int, world_size: int, run_dir: Path,
                 device: str | torch.device = "cpu") -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.every, self.n, self.batch = cfg.train.eval_every, cfg.train.eval_samples, cfg.train.batch_size
        self.threshold, self.split = cfg.model.label_threshold, cfg.data.split
        self.cache_dir = Path(run_dir) / CACHE_DIR
        count = min(self.n, len(dataset))
        self.real_set = Subset(dataset, pick(len(dataset), count, np.random.default_rng(EVAL_SEED)))
        self.weights = cfg.train.eval_weights or None
        self.with_segmenter, self.data_root = cfg.train.eval_segmenter, cfg.data.root
        self.segmenter = None
        self.extractor = self.identity = None  # built at the first evaluation, which reports its time
        self.best_fid = best_fid(Path(run_dir) / "checkpoints")
        self._real = None

    def due(self, step: int, total_steps: int) -> bool:
        """Every ``train.eval_every`` steps and at the last step."""
        return bool(self.every) and (step % self.every == 0 or step == total_steps)

    def improves(self, result: dict) -> bool:
        """Whether ``result`` beats the best FID so far; if so it becomes the best."""
        fid = result.get("fid")
        if fid is None or not math.isfinite(fid) or (self.best_fid is not None and fid >= self.best_fid):
            return False
        self.best_fid = fid
        return True

    @torch.no_grad()
    def run(self, generator: torch.nn.Module) -> dict:
        """Evaluate ``generator`` (collective); the same figures on every rank, e.g.
        ``{"fid": 41.2, "precision": 0.6, "recall": 0.5, "density": 0.8, "coverage": 0.7,
        "vessel_fraction_ks": 0.2, "contrast": 0.4, "contrast_real": 0.9, "n": 256, "n_real": 256,
        "seconds": 3.1}`` (a figure that cannot be computed is None). The global RNG states are
        left as they were (DataLoader draws a base seed from torch's), so training continues as
        it would have without the evaluation."""
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            real_features, real_stats, real_labels = self.real()
            generated = self.generate(generator)
            gen_features, gen_stats = embed(generated, self.extractor, self.rank, self.world_size, EVAL_SEED,
                                            self.batch, 0, self.device)
            gen_labels = self.label_figures(generated)
        result = [None]
        if self.rank == 0:
            result[0] = figures(real_features, real_stats, real_labels, gen_features, gen_stats, gen_labels)
            result[0].update(n=self.n, n_real=len(self.real_set), seconds=time.perf_counter() - started)
        if self.world_size > 1 and dist.is_initialized():
            dist.broadcast_object_list(result, src=0)
        return result[0]

    def real(self):
        """Real features (N, D), FID statistics and per-patch (vessel fraction, contrast, DSC) (N, 3):
        computed (or read from the cache) at the first call, kept after; the extractor is built then."""
        if self._real is None:
            from hpc_gan.models.resnet3d import build_extractor

            self.extractor, self.identity = build_extractor("medicalnet_resnet10", self.weights, seed=EVAL_SEED)
            if self.with_segmenter:
                self.segmenter = self._reference_segmenter()
            features, stats = embed_real(self.real_set, f"{self.split}-training", self.extractor, self.identity,
                                         str(self.cache_dir), self.rank, self.world_size, EVAL_SEED, self.batch, 0,
                                         self.device)
            self._real = features, stats, self.label_figures(self.real_set)
        return self._real

    def _reference_segmenter(self) -> torch.nn.Module:
        """Rank 0 trains (or reads) the cached reference segmenter first; the others then read it."""
        from hpc_gan.eval.agreement import reference_segmenter

        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                with torch.enable_grad():  # run() is under no_grad; training the segmenter is not
                    model, identity = reference_segmenter(self.data_root, self.split, cache_dir=str(self.cache_dir),
                                                          seed=EVAL_SEED, device=self.device)
            if self.world_size > 1 and dist.is_initialized():
                dist.barrier()
        log.info("reference segmenter %s (%s)", identity["key"][:12], "cached" if identity["cached"] else "trained")
        return model

    @torch.no_grad()
    def generate(self, generator: torch.nn.Module) -> Dataset:
        """This rank's share of the N fixed-latent patches (2, X, Y, Z) (image in [-1, 1], label
        binarised to {0, 1} as sampling writes it), as a dataset of length N."""
        from hpc_gan.sample import binarise_label, fixed_latents

        indices = self._share(self.n)
        rounds = -(-math.ceil(self.n / self.world_size) // self.batch)  # the same on every rank (ZeRO-3)
        dtype = next(generator.parameters()).dtype
        was_training = generator.training
        generator.eval()  # BatchNorm running statistics (averaged over ranks by the loop beforehand)
        items = {}
        try:
            for r in range(rounds):
                chunk = indices[r * self.batch:(r + 1) * self.batch].tolist()
                z = fixed_latents(generator, chunk or [0], EVAL_SEED, self.device, dtype)  # (B, latent_dim)
                out = generator(z).float().cpu()                                            # (B, 2, X, Y, Z)
                out[:, 1] = binarise_label(out[:, 1], self.threshold).float()
                items.update(zip(chunk, out))
        finally:
            generator.train(was_training)
        return _Share(self.n, items)

    def label_figures(self, patches: Dataset) -> np.ndarray:
        """(N, 3) per-patch vessel fraction, label contrast and segmenter DSC (NaN without a
        segmenter), gathered in index order (collective)."""
        from hpc_gan.eval.agreement import per_patch_contrast, per_patch_dice
        from hpc_gan.eval.label_stats import vessel_fractions

        indices = self._share(len(patches))
        rows = np.full((len(indices), 3), np.nan)
        for row, i in enumerate(indices):
            patch = torch.as_tensor(patches[int(i)])                    # (2, X, Y, Z)
            image, label = patch[:1].float().numpy(), patch[1:].numpy() > 0.5  # (1, X, Y, Z)
            rows[row, :2] = vessel_fractions(label)[0], per_patch_contrast(image, label)[0]
            if self.segmenter is not None:
                rows[row, 2] = per_patch_dice(self.segmenter, image, label)[0]
        return gather_features(rows, indices, self.world_size)

    def _share(self, n: int) -> np.ndarray:
        # the same split of indices as extract_features uses
        return RankShare(n, self.rank, self.world_size, shuffle=False, even=False).indices(0).astype(np.int64)


class _Share(Dataset):
    """N patches of which this rank holds (and is asked for) only its own share."""

    def __init__(self, n: int, items: dict[int, torch.Tensor]) -> None:
        self.n, self.items = n, items

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


def figures(real_features, real_stats, real_labels, gen_features, gen_stats, gen_labels) -> dict:
    """The figures of one evaluation from both sets' features, FID statistics and per-patch
    (vessel fraction, contrast, DSC) rows; a figure that cannot be computed is None."""
    from hpc_gan.eval.label_stats import compare_distributions
    from hpc_gan.eval.nn_metrics import precision_recall_density_coverage

    out = dict.fromkeys(FIGURES)
    try:
        out["fid"] = gen_stats.fid(real_stats)
    except ValueError as exc:  # non-finite features of a diverged generator
        log.warning("in-training FID not computed: %s", exc)
    if min(len(real_features), len(gen_features)) > NN_K and np.isfinite(gen_features).all():
        out.update(precision_recall_density_coverage(real_features, gen_features, k=NN_K))
    out["vessel_fraction_ks"] = compare_distributions(real_labels[:, 0], gen_labels[:, 0])["ks"]
    for key, rows, column in (("contrast", gen_labels, 1), ("contrast_real", real_labels, 1),
                              ("dice", gen_labels, 2), ("dice_real", real_labels, 2)):
        finite = rows[:, column][np.isfinite(rows[:, column])]  # contrast: labels with vessel and background
        out[key] = float(finite.mean()) if len(finite) else None
    return {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in out.items()}


def best_fid(root: Path) -> float | None:
    """The FID recorded in the state of the checkpoint ``best`` points to (None without one)."""
    tag = ckpt.best_tag(root)
    if tag is None:
        return None
    fid = ckpt.read_state(root / tag).get("eval", {}).get("fid")
    return float(fid) if fid is not None else None
