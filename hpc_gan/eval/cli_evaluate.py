"""``hpc_gan evaluate``: FID, PRD, precision/recall, density/coverage, diversity, label realism,
label–image agreement.

Runs in one process, or distributed when started by torchrun / srun / mpiexec
(``torchrun --nproc_per_node 2 -m hpc_gan.eval ...``): each rank embeds its share.
"""

from __future__ import annotations

import argparse
import os

from hpc_gan.cli_types import add_data_cache_arguments, data_cache_settings, non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", required=True, help="sample directory from `hpc_gan sample --format hdf5`")
    parser.add_argument("--real", required=True, help="packed real data (directory with manifest.json)")
    parser.add_argument("--out", required=True, help="report directory (one holding a report needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a report already in --out (the new one is moved in only when complete)")
    parser.add_argument("--real-split", default="train", help="real patches compared with (default train)")
    parser.add_argument("--heldout-split", default="test", help="real-vs-real baseline split (default test)")
    parser.add_argument("--n", type=positive_int, help="patches per set (default: as many as both sets have)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--extractor", help="medicalnet_resnet10 | medicalnet_resnet18 | medicalnet_resnet50 "
                                            "(default: the one --weights fit, else medicalnet_resnet10)")
    parser.add_argument("--weights", help="pinned weights fetched by `hpc_gan weights fetch` (e.g. "
                                          "medicalnet_resnet10, read from the Hugging Face cache) or a MedicalNet "
                                          "weights file; without it a fixed-seed random extractor (figures not "
                                          "comparable with published FIDs)")
    parser.add_argument("--weights-sha256", help="refuse a weights file whose SHA-256 differs")
    parser.add_argument("--channel", choices=("image", "label"), default="image")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--cache", help="directory caching real-data features and FID statistics "
                                        "(keyed by manifest, extractor, split, N, seed, channel) and the "
                                        "label–image agreement's reference segmenter")
    add_data_cache_arguments(parser)
    parser.add_argument("--agreement-steps", type=positive_int, default=300,
                        help="training steps of the agreement's reference segmenter (default 300)")


def extractor_for(extractor: str | None, weights: str | None) -> str:
    """The extractor asked for, else the architecture of pinned ``weights``, else ResNet-10 (the paper's)."""
    from hpc_gan.models.pretrained import PRETRAINED

    if extractor:
        return extractor
    return PRETRAINED[weights].architecture if weights in PRETRAINED else "medicalnet_resnet10"


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from hpc_gan import dist
    from hpc_gan.eval.evaluate import evaluate

    from hpc_gan.eval.evaluate import check_report_dir

    check_report_dir(args.out, args.overwrite)  # before starting a process group: a plain one-line exit
    env = dist.join_process_group()
    report = evaluate(args.samples, args.real, args.out, real_split=args.real_split, heldout_split=args.heldout_split,
                      n=args.n, seed=args.seed, extractor_name=extractor_for(args.extractor, args.weights), weights=args.weights,
                      weights_sha256=args.weights_sha256, channel=0 if args.channel == "image" else 1,
                      batch=args.batch, rank=env.rank, world_size=env.world_size, cache=args.cache,
                      agreement_steps=args.agreement_steps, data_cache=data_cache_settings(args),
                      overwrite=args.overwrite)
    if report is not None:
        fid = report["fid"]
        print(f"FID {fid['generated_vs_real']:.4g} (held-out baseline "
              f"{'–' if fid['heldout_vs_real'] is None else format(fid['heldout_vs_real'], '.4g')}) over "
              f"{report['n']['generated']} patches; report: {args.out}/report.md, plots: {args.out}/prd.png, "
              f"{args.out}/label_stats.png")
    return 0
