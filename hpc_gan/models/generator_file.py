"""The consolidated generator file: read it back (written by :mod:`hpc_gan.train.consolidate`).

Reading lives beside the generator it rebuilds, below ``train/``, so that sampling and
evaluation (which training also uses) never import the trainer's package. The format is
described in :mod:`hpc_gan.train.consolidate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hpc_gan.errors import CheckpointError
from hpc_gan.io import file_sha256
from hpc_gan.models.finite import check_payload_finite
from hpc_gan.models.gan import Generator
from hpc_gan.models.resnet3d import state_dict_sha256

FORMAT = "hpc_gan.generator"
FORMAT_VERSION = 1


def load_generator(path: str | os.PathLike, variant: str | None = None, verify: bool = True,
                   raw: bool = False) -> tuple[Generator, dict]:
    """Rebuild the generator of a consolidated file (eval mode, fp32, CPU).

    Args:
        path: a file written by :func:`consolidate`.
        variant: if given, the file must be of this variant.
        verify: compare the weights with the digest recorded inside the file, and the file's
            SHA-256 with its ``.sha256`` sidecar when one exists.
        raw: load the trained weights even when the file holds their moving average (EMA).

    Returns:
        (generator, metadata without the weights); ``metadata["weights"]`` is ``"ema"`` or
        ``"raw"``, ``metadata["ema"]`` the EMA's decay, warm-up and step (None without EMA).

    Raises:
        CheckpointError: missing, truncated or foreign file, checksum mismatch (the sidecar's or the
            digest inside), other variant, or (NonFiniteStateError) weights or buffers holding
            NaN or inf, named.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"consolidated generator '{path}' does not exist; run `hpc_gan consolidate RUN_DIR`")
    sidecar = path.with_name(path.name + ".sha256")
    if verify and sidecar.is_file() and sidecar.read_text().split()[0] != file_sha256(path):
        raise CheckpointError(f"'{path}' does not match its checksum in {sidecar.name}: the copy is damaged; copy it again")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors... for damaged files
        raise CheckpointError(f"'{path}' cannot be read as a consolidated generator (truncated or damaged: "
                              f"{exc.__class__.__name__}); consolidate again") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an hpc_gan consolidated generator; run `hpc_gan consolidate RUN_DIR`")
    if variant and payload["variant"] != variant:
        raise CheckpointError(f"'{path}' holds variant '{payload['variant']}', not '{variant}'")
    for name, part in (("state_dict", payload), ("ema.state_dict", payload.get("ema") or {})):
        recorded = part.get("state_dict_sha256")
        if verify and recorded and state_dict_sha256(part["state_dict"]) != recorded:
            raise CheckpointError(f"'{path}': the weights in {name} do not match the digest recorded inside the "
                                  "file (damaged); consolidate again or copy it again")
    check_payload_finite(payload, f"consolidated generator '{path}'", "its samples would be meaningless; consolidate "
                         "an earlier checkpoint (hpc_gan consolidate RUN_DIR --tag step-...)")
    model = payload["model"]
    generator = Generator(model["latent_dim"], model["ngf"], tuple(model["patch_shape"]), model["out_channels"])
    ema = payload.get("ema")
    weights = "raw" if raw or not ema else "ema"
    try:
        generator.load_state_dict(ema["state_dict"] if weights == "ema" else payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"'{path}' does not fit the generator it describes ({first})") from None
    generator.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "ema")}
    meta["ema"] = {k: v for k, v in ema.items() if k not in ("state_dict", "state_dict_sha256")} if ema else None
    return generator, meta | {"weights": weights}
