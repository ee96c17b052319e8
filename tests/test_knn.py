import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_csv_dataset

import main_knn
from models_cross_scale_mae import create_model
from util import checkpoint, config, knn
from util.errors import run_entry_point


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
    argv = ["--checkpoints", "none", str(tmp_path / "mae.pth"), "--train_path", str(train), "--test_path", str(val),
            "--output_dir", str(out), "--num_workers", "0", "--batch_size", "4", "--k", "3", "--majority_k", "3"]
    main_knn.main(config.parse_args(main_knn.get_args_parser(), argv))
    with open(out / "knn_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 5  # checkpoints x classifiers x (4 scales + mean)
    assert {r["checkpoint"] for r in rows} == {"random init (vit_tiny_patch16)", str(tmp_path / "mae.pth")}
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    markdown = (out / "knn_results.md").read_text()
    assert "| checkpoint | classifier | 0.125 | 0.25 | 0.5 | 1 | mean |" in markdown and "## Protocol" in markdown
    protocol = json.loads((out / "protocol.json").read_text())
    assert protocol["memory_images"] == 12 and protocol["evaluation_images"] == 6 and protocol["input_size"] == 32
    assert protocol["final_layernorm"][str(tmp_path / "mae.pth")] == "not applied (as in pretraining)"
    assert (out / "knn_accuracy_vs_scale.png").stat().st_size > 1000


def test_seeded_split_of_a_single_folder(tmp_path, image_folder):
    out = tmp_path / "knn"
    argv = ["--checkpoints", "none", "--model", "vit_tiny_patch16", "--input_size", "32", "--train_path", str(image_folder),
            "--test_path", "split", "--val_fraction", "0.34", "--output_dir", str(out), "--num_workers", "0", "--k", "2",
            "--majority_k", "1", "--scales", "0.5", "1.0"]
    main_knn.main(config.parse_args(main_knn.get_args_parser(), argv))
    protocol = json.loads((out / "protocol.json").read_text())
    assert (protocol["memory_images"], protocol["evaluation_images"]) == (4, 2)
    assert "seeded split (seed 0)" in protocol["data"]


def test_two_process_feature_extraction_gives_the_single_process_results(tmp_path):
    train = write_csv_dataset(tmp_path / "data", 11, "train.csv", size=32)  # odd sizes: uneven shards
    val = write_csv_dataset(tmp_path / "data", 7, "val.csv", size=32)
    argv = ["main_knn.py", "--checkpoints", "none", "--model", "vit_tiny_patch16", "--input_size", "32", "--train_path", str(train),
            "--test_path", str(val), "--num_workers", "0", "--batch_size", "2", "--k", "3", "--majority_k", "3", "--amp", "none"]
    repo, env = Path(__file__).resolve().parents[1], {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *argv, "--output_dir", str(tmp_path / "one")], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv,
                             "--output_dir", str(tmp_path / "two")], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
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
    textbook = torch.zeros(2, 2, dtype=torch.float64).scatter_add_(1, labels[neighbours], (sims.double() / temperature).exp())
    if textbook.isfinite().all():
        assert predicted.tolist() == textbook.argmax(1).tolist()


@pytest.mark.parametrize("temperature", ["0", "-0.07", "nan"])
def test_knn_temperature_must_be_positive(tmp_path, temperature):
    argv = ["--checkpoints", "none", "--model", "vit_tiny_patch16", "--output_dir", str(tmp_path / "o"), "--temperature", temperature]
    with pytest.raises(SystemExit, match=r"^error: --temperature must be > 0, got"):
        run_entry_point(main_knn.main, config.parse_args(main_knn.get_args_parser(), argv))
