"""Weights made for another number of input bands: the RGB <-> multispectral rule for the patch embedding and the
pretraining decoder's output layer (``--rgb_bands``, ``--checkpoint_rgb_bands``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from util.config import Bands
from util.errors import CheckpointError, UsageError


@dataclass(frozen=True)
class BandAdaptation:
    """Which bands are red, green and blue, for loading weights made for another number of input bands.

    The rule; any other band-count mismatch is refused:

    * 3-band (RGB) checkpoint -> C-band model (C > 3): the checkpoint's R, G and B filters are copied unchanged
      to the model's bands ``model_rgb`` (``--rgb_bands``, indices into the bands the model reads); every other
      band's filter is zero. The adapted encoder computes on a C-band image exactly what the RGB encoder
      computes on that image's bands ``model_rgb``; the other bands count only as training moves their filters
      away from zero (their gradients are not zero).
    * C-band checkpoint -> 3-band (RGB) model: the filters of the checkpoint's bands ``checkpoint_rgb``
      (``--checkpoint_rgb_bands``) are kept, in that order, as R, G, B; the other bands' filters are dropped.

    A "filter" is one slice along the input-band axis: of ``patch_embed.proj.weight`` [D, C, p, p], and of the
    pretraining decoder's output layer ``decoder_pred`` (weight [p*p*C, Dd], bias [p*p*C], band-last inside each
    patch as in ``CrossScaleMAE.patchify``), whose predictions of the named bands are then the RGB decoder's.
    """

    model_rgb: tuple[int, ...] | None = None
    checkpoint_rgb: tuple[int, ...] | None = None

    @classmethod
    def of(cls, bands: Bands) -> BandAdaptation:
        """From ``--rgb_bands`` and ``--checkpoint_rgb_bands``."""
        return cls(bands.rgb_bands, bands.checkpoint_rgb_bands)

    def adapt(
        self, tensor: torch.Tensor, target_chans: int, name: str, source: str, what: str = "filters"
    ) -> tuple[torch.Tensor, str | None]:
        """``tensor`` [X, C, ...] (bands on axis 1) with C made ``target_chans`` by the rule above, and a report line
        naming ``name`` (None when the band counts agree and nothing changed).

        Raises:
            CheckpointError: the counts differ and the rule does not apply, or its flag is not given (one line
                naming ``source``, both band counts and the flag).
            UsageError: the flag's indices are not 3 different bands of the side they index.
        """
        chans = tensor.shape[1]
        if chans == target_chans:
            return tensor, None
        mismatch = f"{source}: the checkpoint takes {chans} input bands, the model {target_chans} (--in_chans)"
        if chans == 3 and target_chans > 3:
            if self.model_rgb is None:
                raise CheckpointError(
                    f"{mismatch}; give --rgb_bands R G B: the model's bands that get the RGB filters "
                    "(the other bands start at zero)"
                )
            bands = _rgb_indices(self.model_rgb, target_chans, "--rgb_bands", "the model's")
            shape = list(tensor.shape)
            shape[1] = target_chans
            index = torch.tensor(bands, device=tensor.device)
            adapted = tensor.new_zeros(shape).index_copy(1, index, tensor)
            return adapted, (
                f"{name}: 3 RGB {what} -> bands {' '.join(map(str, bands))} of {target_chans}, "
                f"other {_bands(target_chans - 3)} zero"
            )
        if chans > 3 and target_chans == 3:
            if self.checkpoint_rgb is None:
                raise CheckpointError(
                    f"{mismatch}; give --checkpoint_rgb_bands R G B: the checkpoint's bands whose "
                    "filters the RGB model keeps"
                )
            bands = _rgb_indices(self.checkpoint_rgb, chans, "--checkpoint_rgb_bands", "the checkpoint's")
            adapted = tensor.index_select(1, torch.tensor(bands, device=tensor.device))
            return adapted, (
                f"{name}: {what} of bands {' '.join(map(str, bands))} of {chans} -> RGB, "
                f"other {_bands(chans - 3)} dropped"
            )
        raise CheckpointError(
            f"{mismatch}; only an RGB checkpoint into a multispectral model (--rgb_bands) "
            "or a multispectral one into an RGB model (--checkpoint_rgb_bands) is adapted"
        )


def _bands(count: int) -> str:
    return f"{count} band" + ("s" if count != 1 else "")


def _rgb_indices(bands: tuple[int, ...], count: int, flag: str, whose: str) -> list[int]:
    if len(bands) != 3 or len(set(bands)) != 3 or not all(0 <= b < count for b in bands):
        raise UsageError(
            f"{flag} needs 3 different indices in 0..{count - 1} ({whose} bands) to adapt the weights, "
            f"got {' '.join(map(str, bands))}"
        )
    return list(bands)


def adapt_bands(
    state_dict: dict[str, torch.Tensor], in_chans: int, adaptation: BandAdaptation, source: str, prefix: str = ""
) -> list[str]:
    """Adapt ``{prefix}patch_embed.proj.weight`` [D, C, p, p] and, where present (pretraining checkpoints under our
    names), ``decoder_pred.weight`` [p*p*C, Dd] / ``decoder_pred.bias`` [p*p*C] to ``in_chans`` bands by
    ``BandAdaptation``'s rule, in place. Returns the report lines (none when the band counts agree).

    Raises:
        CheckpointError, UsageError: as ``BandAdaptation.adapt``; a ``decoder_pred`` that does not have p*p*C rows.
    """
    key = f"{prefix}patch_embed.proj.weight"
    proj = state_dict[key]
    if proj.shape[1] == in_chans:
        return []
    state_dict[key], line = adaptation.adapt(proj, in_chans, "patch_embed.proj", source)
    lines = [line]
    if "decoder_pred.weight" in state_dict:
        weight, bias = state_dict["decoder_pred.weight"], state_dict["decoder_pred.bias"]
        area = proj.shape[-2] * proj.shape[-1]  # the pixels of a patch; each holds C outputs, band-last
        if weight.shape[0] != area * proj.shape[1] or bias.shape != weight.shape[:1]:
            raise CheckpointError(
                f"{source}: decoder_pred has {weight.shape[0]} outputs, not {area} pixels x "
                f"{proj.shape[1]} bands per patch"
            )
        weight, line = adaptation.adapt(
            weight.reshape(area, proj.shape[1], -1), in_chans, "decoder_pred", source, "outputs"
        )
        state_dict["decoder_pred.weight"] = weight.reshape(area * in_chans, -1)
        state_dict["decoder_pred.bias"] = adaptation.adapt(bias.reshape(area, -1), in_chans, "decoder_pred", source)[
            0
        ].reshape(-1)
        lines.append(line)
    return lines
