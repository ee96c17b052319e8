import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import HANG_GUARD_S, REPO, bands_of, write_csv_dataset

import main_knn
from model_loading import build_knn_encoder
from models_cross_scale_mae import create_model
from util import config
from util.eval import knn
from util.run import checkpoint
from util.run.process import run_entry_point
from util.weights import layouts


def test_weighted_knn_known_answer():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1])
    query = F.normalize(torch.tensor([[0.7, 0.3]]), dim=1)
    sims, neighbours = knn.topk_cosine(query, memory, k=5)
    # three class-1 neighbours outvote two class-0 ones by count, but exp(sim / 0.07) favours the closer class 0
    assert knn.majority_knn(neighbours, labels, 2).item() == 1
    assert knn.weighted_knn(sims, neighbours, labels, 2, temperature=0.07).item() == 0
    expected = torch.zeros(2, dtype=torch.float64)
    for s, n in zip((query @ memory.T)[0].double(), labels):
        expected[n] += (s / 0.07).exp()
    assert expected.argmax().item() == 0


def test_majority_ties_go_to_the_lowest_class():
    neighbours = torch.tensor([[0, 1, 2, 3]])
    labels = torch.tensor([2, 1, 1, 2])
    assert knn.majority_knn(neighbours, labels, 3).item() == 1


def test_knn_accuracies_on_hand_made_features():
    memory = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]), dim=1)
    memory_labels = torch.tensor([0, 0, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 0.05]]), dim=1)
    result = knn.knn_accuracies(memory, memory_labels, queries, torch.tensor([0, 1, 1]), 2, k=2, majority_k=1)
    assert result == {"weighted": pytest.approx(200 / 3), "majority": pytest.approx(200 / 3)}


def test_chunked_similarity_equals_the_unchunked_one():
    torch.manual_seed(0)
    memory = F.normalize(torch.randn(103, 16), dim=1)
    queries = F.normalize(torch.randn(37, 16), dim=1)
    sims, idx = knn.topk_cosine(queries, memory, k=7, query_chunk=5, memory_chunk=10)
    full_sims, full_idx = (queries @ memory.T).topk(7, dim=1)
    torch.testing.assert_close(sims, full_sims)
    assert torch.equal(idx, full_idx)


def previous_topk_cosine(queries, memory, k, query_chunk, memory_chunk):
    """The search before blocks were reduced to their top k first: each block's whole similarity and index table
    concatenated to the best k so far, then the top k of that ([query_chunk, memory_chunk + k] int64 indices)."""
    k = min(k, len(memory))
    best_sims, best_idx = [], []
    for q in range(0, len(queries), query_chunk):
        query = queries[q : q + query_chunk]
        sims, idx = torch.full((len(query), 0), -float("inf")), torch.zeros((len(query), 0), dtype=torch.long)
        for m in range(0, len(memory), memory_chunk):
            block = query @ memory[m : m + memory_chunk].T
            sims = torch.cat([sims, block], dim=1)
            idx = torch.cat([idx, torch.arange(m, m + block.shape[1]).expand(len(query), -1)], dim=1)
            sims, order = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx.gather(1, order)
        best_sims.append(sims)
        best_idx.append(idx)
    return torch.cat(best_sims), torch.cat(best_idx)


@pytest.mark.parametrize("k, memory_chunk", [(7, 10), (7, 4), (3, 103), (200, 16)])
def test_blockwise_top_k_first_gives_what_the_whole_block_search_gave(k, memory_chunk):
    torch.manual_seed(1)
    memory = F.normalize(torch.randn(103, 16), dim=1)
    queries = F.normalize(torch.randn(37, 16), dim=1)
    sims, idx = knn.topk_cosine(queries, memory, k=k, query_chunk=5, memory_chunk=memory_chunk)
    expected_sims, expected_idx = previous_topk_cosine(queries, memory, k, 5, memory_chunk)
    assert torch.equal(sims, expected_sims) and torch.equal(idx, expected_idx)  # the same block products: bit-equal
    assert sims.shape == (37, min(k, 103))


@pytest.mark.cuda
def test_knn_search_on_the_gpu_finds_the_cpu_neighbours(cuda_device):
    torch.manual_seed(2)
    centres, labels, query_labels = torch.randn(5, 32), torch.arange(300) % 5, torch.arange(50) % 5
    memory = F.normalize(centres[labels] + 0.5 * torch.randn(300, 32), dim=1)  # clusters: no vote hangs on a near-tie
    queries = F.normalize(centres[query_labels] + 0.5 * torch.randn(50, 32), dim=1)
    sims, idx = knn.topk_cosine(queries.to(cuda_device), memory.to(cuda_device), k=20, memory_chunk=64)
    assert sims.device == cuda_device and idx.device == cuda_device
    cpu_sims, cpu_idx = knn.topk_cosine(queries, memory, k=20, memory_chunk=64)
    torch.testing.assert_close(sims.cpu(), cpu_sims, atol=1e-5, rtol=0)  # GEMM rounding differs between devices
    assert (idx.cpu() == cpu_idx).float().mean() > 0.95  # near-ties may swap places
    on_device = knn.knn_accuracies(memory, labels, queries, query_labels, 5, k=20, majority_k=5, device=cuda_device)
    assert on_device == knn.knn_accuracies(memory, labels, queries, query_labels, 5, k=20, majority_k=5)


@pytest.mark.parametrize("mode, expected", [("resize", [64, 64, 64, 64]), ("native", [16, 16, 32, 64])])
def test_scale_modes_produce_the_expected_sizes(mode, expected):
    images = torch.rand(2, 3, 64, 64)
    sizes = [knn.rescale(images, s, 16, mode).shape[-1] for s in (0.125, 0.25, 0.5, 1.0)]
    assert sizes == expected


def test_area_downsampling_averages_blocks():
    images = torch.arange(16.0).reshape(1, 1, 4, 4)
    small = knn.rescale(images, 0.5, 1, "native")
    torch.testing.assert_close(small, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_main_writes_csv_markdown_plot_and_protocol(tmp_path):
    train = write_csv_dataset(tmp_path / "data", 12, "train.csv", size=32)
    val = write_csv_dataset(tmp_path / "data", 6, "val.csv", size=32)
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "mae.pth")
    out = tmp_path / "knn"
    argv = [
        "--checkpoints",
        "none",
        str(tmp_path / "mae.pth"),
        "--train_path",
        str(train),
        "--test_path",
        str(val),
        "--output_dir",
        str(out),
        "--num_workers",
        "0",
        "--batch_size",
        "4",
        "--k",
        "3",
        "--majority_k",
        "3",
    ]
    main_knn.main(config.parse_args(main_knn.get_args_parser(), argv))
    with open(out / "knn_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 5  # checkpoints x classifiers x (4 scales + mean)
    assert {r["checkpoint"] for r in rows} == {
        "random init (vit_tiny_patch16: ViT 128 wide, 4 deep, patch 8)",
        str(tmp_path / "mae.pth"),
    }
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    markdown = (out / "knn_results.md").read_text()
    assert "| checkpoint | schedule seen | classifier | 0.125 | 0.25 | 0.5 | 1 | mean |" in markdown
    assert "## Protocol" in markdown
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["memory_images"] == 12 and protocol["evaluation_images"] == 6 and protocol["input_size"] == 32
    assert protocol["evaluation_set"] == "val.csv"  # with evaluation_images, the plot's title
    assert protocol["final_layernorm"][str(tmp_path / "mae.pth")] == "not applied (as in pretraining)"
    assert (out / "knn_accuracy_vs_scale.png").stat().st_size > 1000


def test_seeded_split_of_a_single_folder(tmp_path, image_folder):
    out = tmp_path / "knn"
    argv = [
        "--checkpoints",
        "none",
        "--model",
        "vit_tiny_patch16",
        "--input_size",
        "32",
        "--train_path",
        str(image_folder),
        "--test_path",
        "split",
        "--val_fraction",
        "0.34",
        "--output_dir",
        str(out),
        "--num_workers",
        "0",
        "--k",
        "2",
        "--majority_k",
        "1",
        "--scales",
        "0.5",
        "1.0",
    ]
    main_knn.main(config.parse_args(main_knn.get_args_parser(), argv))
    protocol = json.loads((out / "protocol.json").read_text())
    assert (protocol["memory_images"], protocol["evaluation_images"]) == (4, 2)
    assert "seeded split (seed 0)" in protocol["data"]


def test_the_users_memory_set_is_never_evaluated_on_the_sample(tmp_path, image_folder):
    argv = ["--checkpoints", "none", "--model", "vit_tiny_patch16", "--train_path", str(image_folder)]
    with pytest.raises(SystemExit, match=r"^error: --test_path missing: give the evaluation set of --train_path "):
        run_entry_point(main_knn.main, config.parse_args(main_knn.get_args_parser(), argv))
    sample = config.parse_args(main_knn.get_args_parser(), ["--checkpoints", "none"])  # the sample: its val.csv
    assert config.evaluation_path(sample.train_path, sample.test_path) == str(config.DEFAULT_VAL_CSV)


def test_two_process_feature_extraction_gives_the_single_process_results(tmp_path):
    train = write_csv_dataset(tmp_path / "data", 11, "train.csv", size=32)  # odd sizes: uneven shards
    val = write_csv_dataset(tmp_path / "data", 7, "val.csv", size=32)
    argv = [
        "main_knn.py",
        "--checkpoints",
        "none",
        "--model",
        "vit_tiny_patch16",
        "--input_size",
        "32",
        "--train_path",
        str(train),
        "--test_path",
        str(val),
        "--num_workers",
        "0",
        "--batch_size",
        "2",
        "--k",
        "3",
        "--majority_k",
        "3",
        "--amp",
        "none",
    ]
    repo, env = REPO, {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, *argv, "--output_dir", str(tmp_path / "one")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    double = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *argv,
            "--output_dir",
            str(tmp_path / "two"),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert single.returncode == 0 and double.returncode == 0, double.stderr[-2000:]
    assert (tmp_path / "one" / "knn_results.csv").read_text() == (tmp_path / "two" / "knn_results.csv").read_text()
    assert json.loads((tmp_path / "two" / "protocol.json").read_text())["evaluation_images"] == 7


@pytest.mark.parametrize("temperature, expected", [(1e-5, 0), (1e-3, 0), (0.07, 1), (1.0, 1), (1e3, 1)])
def test_weighted_knn_is_stable_over_the_whole_temperature_range(temperature, expected):
    # exp(0.99 / 1e-5) overflows float64 (inf votes, argmax by accident); votes relative to each query's top
    # similarity do not overflow and keep the argmax of the textbook formula wherever that one is finite
    sims = torch.tensor([[0.99, 0.98, 0.97], [0.5, 0.49, 0.2]])
    neighbours = torch.tensor([[0, 1, 2], [2, 0, 1]])
    labels = torch.tensor([0, 1, 1])
    predicted = knn.weighted_knn(sims, neighbours, labels, 2, temperature)
    assert predicted.tolist() == [expected, 1]
    textbook = torch.zeros(2, 2, dtype=torch.float64).scatter_add_(
        1, labels[neighbours], (sims.double() / temperature).exp()
    )
    if textbook.isfinite().all():
        assert predicted.tolist() == textbook.argmax(1).tolist()


@pytest.mark.parametrize("temperature", ["0", "-0.07", "nan"])
def test_knn_temperature_must_be_positive(tmp_path, temperature):
    argv = [
        "--checkpoints",
        "none",
        "--model",
        "vit_tiny_patch16",
        "--output_dir",
        str(tmp_path / "o"),
        "--temperature",
        temperature,
    ]
    with pytest.raises(SystemExit, match=r"^error: --temperature must be > 0, got"):
        run_entry_point(main_knn.main, config.parse_args(main_knn.get_args_parser(), argv))


def knn_argv(tmp_path, train, val, *checkpoints):
    return [
        "--checkpoints",
        *checkpoints,
        "--train_path",
        str(train),
        "--test_path",
        str(val),
        "--output_dir",
        str(tmp_path / "knn"),
        "--num_workers",
        "0",
        "--batch_size",
        "4",
        "--k",
        "3",
        "--majority_k",
        "3",
        "--scales",
        "1",
    ]


def test_image_folder_evaluation_tree_lacking_a_class_is_scored_by_class_name(tmp_path):
    from conftest import make_tree

    train = make_tree(tmp_path / "train", ["beach", "forest"], per_class=4)  # beach bright, forest dark
    val = make_tree(tmp_path / "val", ["forest"], per_class=4)  # no beach/: forest was label 0 here
    for i in range(4):  # val's forest images must be dark: the class they belong to in training
        from conftest import make_image

        make_image(1, seed=100 + i, size=32).save(val / "forest" / f"{i}.png")
    main_knn.main(
        config.parse_args(
            main_knn.get_args_parser(),
            [
                *knn_argv(tmp_path, train, val, "none"),
                "--model",
                "vit_tiny_patch16",
                "--patch_size",
                "8",
                "--input_size",
                "32",
            ],
        )
    )
    with open(tmp_path / "knn" / "knn_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {float(r["top1"]) for r in rows} == {100.0}
    assert json.loads((tmp_path / "knn" / "protocol.json").read_text())["class_names"] == ["beach", "forest"]


def test_knn_of_a_fine_tuned_classifier_uses_its_pre_logits_features(tmp_path):
    import models_vit

    train = write_csv_dataset(tmp_path / "data", 8, "train.csv", size=32)
    val = write_csv_dataset(tmp_path / "data", 4, "val.csv", size=32)
    torch.manual_seed(0)
    classifier = models_vit.create_classifier("vit_tiny_patch16", 2, img_size=32, patch_size=8, global_pool=True)
    checkpoint.save_checkpoint({"model": classifier.state_dict()}, tmp_path / "ft.pth")
    (tmp_path / "knn").mkdir()
    (tmp_path / "knn" / "checkpoint-last.pth").write_bytes(b"a training run's")  # --output_dir of a training run
    main_knn.main(
        config.parse_args(main_knn.get_args_parser(), knn_argv(tmp_path, train, val, str(tmp_path / "ft.pth")))
    )
    protocol = json.loads((tmp_path / "knn" / "knn" / "protocol.json").read_text())  # its knn/ subfolder
    assert "mean of the patch tokens + fc_norm" in protocol["features_per_checkpoint"][str(tmp_path / "ft.pth")]
    # the same features, by hand: the classifier's forward_head(pre_logits=True)
    encoder, _, _ = build_knn_encoder(
        str(tmp_path / "ft.pth"),
        layouts.read_encoder(tmp_path / "ft.pth"),
        "vit_tiny_patch16",
        input_size=32,
        patch_size=8,
        bands=bands_of(),
    )
    images = torch.randn(2, 3, 32, 32)
    classifier.eval(), encoder.eval()
    expected = F.normalize(classifier.forward_head(classifier.forward_features(images), pre_logits=True), dim=1)
    assert torch.allclose(knn.encoder_features(encoder, images, knn.CLASSIFIER_POOL, True), expected, atol=1e-5)


def test_every_checkpoint_is_checked_before_the_first_is_scored(tmp_path, capsys):
    train = write_csv_dataset(tmp_path / "data", 8, "train.csv", size=32)
    val = write_csv_dataset(tmp_path / "data", 4, "val.csv", size=32)
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "mae.pth")
    small = create_model("cross_scale_mae_vit_small", input_size=32, patch_size=8)
    checkpoint.save_checkpoint(
        {"model": small.state_dict(), "model_config": small.model_config}, tmp_path / "small.pth"
    )
    with pytest.raises(SystemExit, match=r"^error: .*small.pth"):
        run_entry_point(
            main_knn.main,
            config.parse_args(
                main_knn.get_args_parser(),
                knn_argv(tmp_path, train, val, str(tmp_path / "mae.pth"), str(tmp_path / "small.pth")),
            ),
        )
    assert "%" not in capsys.readouterr().out  # nothing was scored (and lost) before the bad one was found


def test_non_finite_features_are_refused_not_scored(tmp_path):
    train = write_csv_dataset(tmp_path / "data", 8, "train.csv", size=32)
    val = write_csv_dataset(tmp_path / "data", 4, "val.csv", size=32)
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    state = mae.state_dict()
    state["encoder.blocks.0.mlp.fc1.bias"][:] = float("inf")
    checkpoint.save_checkpoint({"model": state, "model_config": mae.model_config}, tmp_path / "inf.pth")
    # refused when loaded (layouts.check_finite), before any feature is computed
    with pytest.raises(SystemExit, match=r"^error: .*inf.pth: non-finite values \(NaN/inf\) in blocks.0.mlp.fc1.bias"):
        run_entry_point(
            main_knn.main,
            config.parse_args(main_knn.get_args_parser(), knn_argv(tmp_path, train, val, str(tmp_path / "inf.pth"))),
        )


@pytest.mark.parametrize("encoder_norm", [False, True])
def test_k_clipped_to_a_small_memory_set_is_said_and_recorded_and_both_rows_are_alike(tmp_path, capsys, encoder_norm):
    train = write_csv_dataset(tmp_path / "data", 6, "train.csv", size=32)
    val = write_csv_dataset(tmp_path / "data", 4, "val.csv", size=32)
    torch.manual_seed(0)
    mae = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8, encoder_norm=encoder_norm)
    checkpoint.save_checkpoint({"model": mae.state_dict(), "model_config": mae.model_config}, tmp_path / "mae.pth")
    argv = knn_argv(tmp_path, train, val, "none", str(tmp_path / "mae.pth"))
    argv[argv.index("--k") + 1] = "20"  # the default, on 6 memory images
    main_knn.main(config.parse_args(main_knn.get_args_parser(), argv))
    printed = capsys.readouterr().out
    assert "note: --k 20: the memory set has 6 images, so k = 6 is used" in printed
    assert "--majority_k" not in printed  # 3 fits: not clipped, nothing said
    protocol = json.loads((tmp_path / "knn" / "protocol.json").read_text())
    assert (protocol["k"], protocol["majority_k"]) == (6, 3)
    assert protocol["weighted_knn"].startswith("k = 6 (20 asked: the memory set has 6 images), cosine")
    assert protocol["majority_knn"].startswith("k = 3, cosine")
    assert "k = 6 (20 asked" in (tmp_path / "knn" / "knn_results.md").read_text()
    norms = protocol["final_layernorm"]
    assert norms[str(tmp_path / "mae.pth")] == ("applied" if encoder_norm else "not applied (as in pretraining)")
    applied = "applied" if encoder_norm else "not applied"
    assert (
        norms["random init (vit_tiny_patch16: ViT 128 wide, 4 deep, patch 8)"]
        == f"{applied} (as the checkpoints it is compared with)"
    )


def test_neighbours_used_never_exceed_the_memory_set(capsys):
    assert knn.neighbours_used(20, 5, 100) == (20, 5) and capsys.readouterr().out == ""
    assert knn.neighbours_used(20, 5, 4) == (4, 4)
    assert capsys.readouterr().out.splitlines() == [
        "note: --k 20: the memory set has 4 images, so k = 4 is used",
        "note: --majority_k 5: the memory set has 4 images, so k = 4 is used",
    ]
