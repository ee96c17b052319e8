"""Checks that torchgeo and TerraTorch load this project's exports with every tensor and fine-tune them one step
(run by benchmarks/interop_check.sh, which builds their environments; not part of the test suite).

    python benchmarks/interop_check.py prepare OUT      # this project's environment: exports + reference features
    ENV/bin/python benchmarks/interop_check.py torchgeo OUT      # torchgeo 0.10.1 (Python >= 3.12)
    ENV/bin/python benchmarks/interop_check.py terratorch OUT    # TerraTorch 1.2.13 (pins torchgeo < 0.10)

``prepare`` exports the tiny encoder of the quick start (64 px, patch 8; seeded random weights: what is checked is
loading, not accuracy) for RGB (data/sentinel2_rgb) and for 13 bands (data/sentinel2_ms), a ViT-B at 128 px under the
published weights' torchgeo file name, and the encoders' features on a fixed input. The other two commands need only
torch, timm, safetensors and their tool; each check prints one ``PASS name: ...`` or ``FAIL name: ...`` line, and the
exit status is the number of failures.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = {"rgb": ("sentinel2_rgb", 3), "s2": ("sentinel2_ms", 13)}
SIZE, CLASSES = 64, 3
failures: list[str] = []


def check(name: str, function) -> None:
    """Run one check; print PASS with its detail or FAIL with the error's last line."""
    try:
        detail = function()
        print(f"PASS {name}: {detail}", flush=True)
    except Exception as e:
        failures.append(name)
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        print(f"FAIL {name}: {last}", flush=True)


def reference_input(chans: int) -> torch.Tensor:
    return torch.randn(2, chans, SIZE, SIZE, generator=torch.Generator().manual_seed(chans))


def prepare(out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import models_cross_scale_mae as models_mae
    from model_loading import export_encoder
    from util.config import FMOW_RGB_MEAN, FMOW_RGB_STD
    from util.files import file_sha256
    from util.weights import published

    for key, (sample, chans) in SAMPLES.items():
        torch.manual_seed(chans)
        mae = models_mae.create_model("cross_scale_mae_vit_tiny", input_size=SIZE, patch_size=8, in_chans=chans).eval()
        args = {
            "model": "cross_scale_mae_vit_tiny",
            "in_chans": chans,
            "train_path": f"data/{sample}/train.csv",
            "mean": list(FMOW_RGB_MEAN),
            "std": list(FMOW_RGB_STD),
        }
        if chans != 3:
            stats = json.loads((ROOT / "data" / sample / "band_stats.json").read_text())
            args.update(
                band_stats=str(ROOT / "data" / sample / "band_stats.json"), mean=stats["mean"], std=stats["std"]
            )
        export_encoder(mae, out / key, args, checkpoint="(seeded random init)")
        with torch.no_grad():  # what pretraining computes: blocks, no final norm (untrained: exported as identity)
            vit = mae.encoder
            features = vit.blocks(vit._pos_embed(vit.patch_embed(reference_input(chans))))
        torch.save(features, out / f"{key}_features.pt")
        print(f"exported {out / key} and its features on a fixed input")
    torch.manual_seed(0)  # a ViT-B at 128 px under the published weights' file name (random weights)
    base = models_mae.create_model("cross_scale_mae_vit_base", input_size=128, patch_size=16).eval()
    entry = published.PUBLISHED["FMOW_RGB_BASE"]
    done = export_encoder(base, out / "vit_base", {"model": "cross_scale_mae_vit_base"})
    hashed = out / f"{entry['stem']}-{file_sha256(done.pth)[:8]}.pth"
    done.pth.replace(hashed)
    print(f"exported {hashed}")


def state_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def compare(model: torch.nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> str:
    """Every tensor of ``expected`` must be in ``model`` (under ``prefix``) and equal; returns a count."""
    state = model.state_dict()
    missing = [k for k in expected if prefix + k not in state]
    unequal = [k for k in expected if prefix + k in state and not torch.equal(state[prefix + k], expected[k])]
    if missing or unequal:
        raise AssertionError(f"missing {missing[:3]}, not equal {unequal[:3]}")
    return f"all {len(expected)} exported tensors equal"


def one_step(task, batch: dict[str, torch.Tensor]) -> str:
    """One optimiser step of a Lightning task on ``batch``; the loss must be finite and the weights must move."""
    from lightning.pytorch import Trainer

    before = [p.detach().clone() for p in task.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader([batch], batch_size=None)
    trainer = Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, train_dataloaders=loader, val_dataloaders=loader)  # validation: the LR scheduler's val_loss
    losses = [v for k, v in trainer.callback_metrics.items() if "train" in k and "loss" in k]  # train_loss, train/loss
    loss = losses[0] if losses else None
    after = [p.detach() for p in task.parameters() if p.requires_grad]
    moved = sum(not torch.equal(b, a) for b, a in zip(before, after))
    if loss is None or not torch.isfinite(loss) or moved == 0:
        raise AssertionError(f"train_loss {loss}, {moved} tensors changed")
    return f"train_loss {float(loss):.4f}, {moved} of {len(before)} trainable tensors changed"


def run_torchgeo(out: Path) -> None:
    from importlib.metadata import version

    import torchgeo
    from torchgeo.tasks import Classification, SemanticSegmentation

    print(
        f"torchgeo {torchgeo.__version__}, segmentation-models-pytorch {version('segmentation_models_pytorch')}, "
        f"timm {version('timm')}, torch {torch.__version__}"
    )
    for key, (_, chans) in SAMPLES.items():
        directory = out / key
        expected = state_of(directory)

        def classification(chans=chans, directory=directory, expected=expected, key=key):
            task = Classification(
                model=f"local-dir:{directory}", weights=True, in_channels=chans, num_classes=CLASSES, lr=1e-3
            )
            loaded = compare(task.model, expected)
            with torch.no_grad():
                features = task.model.eval().forward_features(reference_input(chans))
            torch.testing.assert_close(features, torch.load(out / f"{key}_features.pt"), rtol=0, atol=0)
            images = torch.randn(4, chans, SIZE, SIZE)
            return f"{loaded}; features equal; " + one_step(task, {"image": images, "label": torch.arange(4) % CLASSES})

        def segmentation(chans=chans, directory=directory, expected=expected):
            task = SemanticSegmentation(
                model="dpt",
                backbone=f"tu-local-dir:{directory}",
                weights=True,
                in_channels=chans,
                num_classes=CLASSES,
                lr=1e-3,
            )
            loaded = compare(task.model.encoder, expected, prefix="model.")
            batch = {"image": torch.randn(4, chans, SIZE, SIZE), "mask": torch.randint(0, CLASSES, (4, SIZE, SIZE))}
            return f"{loaded}; " + one_step(task, batch)

        check(f"torchgeo Classification(model='local-dir:{key}', weights=True, in_channels={chans})", classification)
        check(
            f"torchgeo SemanticSegmentation(model='dpt', backbone='tu-local-dir:{key}', in_channels={chans})",
            segmentation,
        )

    def weight_enum():
        from torchgeo.models import vit_base_patch16_224
        from torchvision.models._api import WeightsEnum

        sys.path.insert(0, str(ROOT))
        from util.weights import published

        file = next(out.glob(f"{published.PUBLISHED['FMOW_RGB_BASE']['stem']}-*.pth"))
        corrupt = out / "hub" / "corrupt" / file.name
        corrupt.parent.mkdir(parents=True, exist_ok=True)
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor
        corrupt.write_bytes(bytes(data))

        class CrossScaleMAEBase16_Weights(WeightsEnum):  # what upstreaming adds, with a hosted URL
            FMOW_RGB = published.torchgeo_weights("FMOW_RGB_BASE", file.resolve().as_uri())
            CORRUPT_COPY = published.torchgeo_weights("FMOW_RGB_BASE", corrupt.resolve().as_uri())

        weights = CrossScaleMAEBase16_Weights.FMOW_RGB
        model = vit_base_patch16_224(weights=weights, img_size=weights.meta["img_size"], num_classes=0)
        loaded = compare(model, torch.load(file, weights_only=True))
        try:
            CrossScaleMAEBase16_Weights.CORRUPT_COPY.get_state_dict(
                progress=False, check_hash=True, weights_only=True, model_dir=str(out / "hub" / "bad")
            )
        except RuntimeError as e:
            refused = f"a corrupted copy is refused ({str(e).splitlines()[0][:60]}...)"
        else:
            raise AssertionError("a corrupted copy loaded")
        return f"{loaded}; hash {file.stem.rsplit('-', 1)[1]} checked; {refused}"

    torch.hub.set_dir(str(out / "hub"))
    check("torchgeo weight enum (util/weights/published.py, file:// URL) -> models.vit_base_patch16_224", weight_enum)


def run_terratorch(out: Path) -> None:
    import subprocess
    from importlib.metadata import version

    from terratorch.models import EncoderDecoderFactory
    from terratorch.tasks import SemanticSegmentationTask

    print(
        f"terratorch {version('terratorch')}, torchgeo {version('torchgeo')}, timm {version('timm')}, "
        f"torch {torch.__version__}"
    )
    model_args = {
        "backbone_pretrained": True,
        "backbone_out_indices": [0, 1, 2, 3],
        "necks": [{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "LearnedInterpolateToPyramidal"}],
        "decoder": "UperNetDecoder",
        "decoder_channels": 64,
        "num_classes": CLASSES,
    }
    for key, (_, chans) in SAMPLES.items():
        directory = out / key
        expected = state_of(directory)

        def factory(chans=chans, directory=directory, expected=expected, key=key):
            model = EncoderDecoderFactory().build_model(
                task="segmentation", backbone=f"timm_local-dir:{directory}", **model_args
            )
            loaded = compare(model.encoder, expected, prefix="model.")
            with torch.no_grad():
                blocks = model.encoder.eval()(reference_input(chans))
            reference = torch.load(out / f"{key}_features.pt")[:, 1:]  # patch tokens of the last block
            last = blocks[-1].flatten(2).transpose(1, 2)
            torch.testing.assert_close(last, reference, rtol=0, atol=0)
            task = SemanticSegmentationTask(
                model_factory="EncoderDecoderFactory",
                loss="ce",
                ignore_index=-1,
                lr=1e-3,
                model_args={"backbone": f"timm_local-dir:{directory}", **model_args},
            )
            compare(task.model.encoder, expected, prefix="model.")
            batch = {"image": torch.randn(4, chans, SIZE, SIZE), "mask": torch.randint(0, CLASSES, (4, SIZE, SIZE))}
            return f"{loaded}; last block's features equal; " + one_step(task, batch)

        check(
            f"TerraTorch EncoderDecoderFactory + UperNetDecoder, backbone='timm_local-dir:{key}' ({chans} bands)",
            factory,
        )

    for key, config in (("rgb", "cross_scale_mae_upernet_rgb.yaml"), ("s2", "cross_scale_mae_upernet_s2.yaml")):

        def shipped(key=key, config=config):
            command = [
                str(Path(sys.executable).parent / "terratorch"),
                "fit",
                "--config",
                f"configs/terratorch/{config}",
                f"--model.init_args.model_args.backbone=timm_local-dir:{out / key}",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=1",
                "--trainer.accelerator=cpu",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                f"--trainer.default_root_dir={out / 'terratorch_fit'}",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
            ]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode:
                raise AssertionError(f"exit {done.returncode}: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
            steps = [line for line in (done.stdout + done.stderr).splitlines() if "max_steps=1" in line]
            return "terratorch fit ran one step on the embedded sample" + (f" ({steps[-1].strip()})" if steps else "")

        check(
            f"TerraTorch shipped config configs/terratorch/{config} (terratorch fit, 1 step, embedded sample)", shipped
        )


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "torchgeo", "terratorch"):
        raise SystemExit(f"usage: {sys.argv[0]} prepare|torchgeo|terratorch OUT")
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    {"prepare": prepare, "torchgeo": run_torchgeo, "terratorch": run_terratorch}[sys.argv[1]](out)
    raise SystemExit(len(failures))


if __name__ == "__main__":
    main()
