import pytest
from conftest import make_tree, write_csv_dataset

from util import config
from util.data import datasets
from util.data.datasets import DataError, build_dataset
from util.data.transforms import build_transform


def test_csv_labels_and_relative_paths(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(False, 32))
    assert len(dataset) == 8
    assert dataset.targets == [0, 1] * 4
    img, label = dataset[1]
    assert img.shape == (3, 32, 32) and label == 1
    assert dataset.samples[0][0] == str(csv_dataset.parent / "images" / "train_0.jpg")


def test_auto_detects_each_format(csv_dataset, image_folder, tmp_path):
    assert datasets.detect_dataset_type(csv_dataset) == "fmow_rgb"
    assert datasets.detect_dataset_type(image_folder) == "imagefolder"
    assert datasets.detect_dataset_type(image_folder / "dark") == "folder"


def test_image_folder_classes_and_unlabelled_folder(image_folder):
    labelled = build_dataset(image_folder, "auto")
    assert labelled.classes == ["bright", "dark"] and labelled.targets == [0, 0, 0, 1, 1, 1]
    unlabelled = build_dataset(image_folder, "folder")
    assert len(unlabelled) == 6 and set(unlabelled.targets) == {-1}


@pytest.mark.parametrize(
    "content, message",
    [
        ("label\n0\n", r"row 2: needs 2 columns \(label, image path\), found 1"),
        ("label,path\nwater,a.jpg\n", r"row 2: label 'water' in column 0 is not an integer"),
        ("label,path\n0,missing.jpg\n", r"1 image path\(s\) do not exist, first row 2: .*missing.jpg"),
        ("label,path\n", r"no images found"),
    ],
)
def test_bad_csv_files_are_named_with_the_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_dataset(path)


def test_corrupt_image_error_names_file_and_row(csv_dataset):
    image = csv_dataset.parent / "images" / "train_2.jpg"
    image.write_bytes(image.read_bytes()[:40])
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(False, 32))
    with pytest.raises(DataError, match=r"train_2.jpg \(row 4 of .*train.csv\): cannot read image"):
        dataset[2]


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        build_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="--dataset_type 'naip' is not supported"):
        build_dataset(tmp_path, "naip")


def write_labels_csv(path, rows, header=("label", "image_path")):
    import csv as csv_module

    from conftest import make_image

    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv_module.writer(f)
        writer.writerow(header)
        for i, row in enumerate(rows):
            image = f"images/{path.stem}_{i}.png"
            make_image(i % 2, seed=i, size=32).save(path.parent / image)
            writer.writerow([row[0], image, *row[1:]])
    return path


def test_image_folder_splits_are_matched_by_class_name(tmp_path, capsys):
    train = build_dataset(make_tree(tmp_path / "train", ["beach", "forest", "river"]))
    val = build_dataset(make_tree(tmp_path / "val", ["forest"]), classes=train.classes)  # val lacks beach/ and river/
    assert set(val.targets) == {1}  # forest is label 1 in every split (it was 0 in val before)
    assert datasets.check_labels(train, [val]) == ["beach", "forest", "river"]
    assert "no images of class(es) beach, river" in capsys.readouterr().out


def test_a_class_only_in_evaluation_and_a_single_class_training_set_are_refused(tmp_path):
    train = build_dataset(make_tree(tmp_path / "train", ["beach", "forest"]))
    with pytest.raises(DataError, match="class folder.s. glacier are not among the training classes .beach, forest."):
        build_dataset(make_tree(tmp_path / "val", ["forest", "glacier"]), classes=train.classes)
    make_tree(tmp_path / "wrapped" / "EuroSAT", ["beach", "forest"])
    wrapped = build_dataset(tmp_path / "wrapped")
    with pytest.raises(DataError, match=r"wrapped: only 1 class \(EuroSAT\) in the training set.*wrapper folder"):
        datasets.check_labels(wrapped, [train])
    csv_train = build_dataset(write_labels_csv(tmp_path / "c" / "train.csv", [(0,), (0,), (1,)]))
    csv_val = build_dataset(write_labels_csv(tmp_path / "c" / "val.csv", [(0,), (2,)]))
    with pytest.raises(
        DataError, match=r"row 3 of .*val.csv\): class 2 is in the evaluation set but not in the training set"
    ):
        datasets.check_labels(csv_train, [csv_val], nb_classes=3)


@pytest.mark.parametrize(
    "label, message",
    [
        ("5", r"row 3 of .*val.csv\): label 5 outside 0..3 \(--nb_classes 4\)"),
        ("-1", r"row 3 of .*val.csv\): label -1 is no class index \(0..K-1\)"),
    ],
)
def test_evaluation_labels_are_range_checked_at_start_up(tmp_path, label, message):
    train = build_dataset(write_labels_csv(tmp_path / "train.csv", [(0,), (1,), (2,), (3,)]))
    val = build_dataset(write_labels_csv(tmp_path / "val.csv", [(1,), (label,)]))
    with pytest.raises(DataError, match=message):
        datasets.check_labels(train, [val], nb_classes=4)


def test_a_huge_csv_label_builds_no_huge_class_list(tmp_path):
    path = write_labels_csv(tmp_path / "train.csv", [(0,), (1_000_000_000,)])
    dataset = build_dataset(path)  # used to build [str(i) for i in range(10**9 + 1)]: out of memory
    assert dataset.label_names == {0: "0", 1_000_000_000: "1000000000"}
    with pytest.raises(DataError, match="highest label 1000000000 but only 2 distinct labels"):
        datasets.check_labels(dataset, [dataset])


def test_csv_class_name_column_travels_and_must_agree(tmp_path):
    header = ("label", "image_path", "class_name")
    train = build_dataset(write_labels_csv(tmp_path / "train.csv", [(0, "water"), (1, "forest")], header))
    val = build_dataset(write_labels_csv(tmp_path / "val.csv", [(1, "forest")], header))
    assert datasets.check_labels(train, [val]) == ["water", "forest"]
    wrong = build_dataset(write_labels_csv(tmp_path / "wrong.csv", [(1, "water")], header))
    with pytest.raises(DataError, match="label 1 is class 'water' here but 'forest'"):
        datasets.check_labels(train, [wrong])
    with pytest.raises(DataError, match=r"row 3: label 0 is named 'forest' here, 'water' in an earlier row"):
        build_dataset(write_labels_csv(tmp_path / "clash.csv", [(0, "water"), (0, "forest")], header))


def test_the_shipped_sentinel2_csvs_carry_class_names():
    train, val = build_dataset(config.DEFAULT_TRAIN_CSV), build_dataset(config.DEFAULT_VAL_CSV)
    names = datasets.check_labels(train, [val])
    assert "dense_vegetation" in names and all(not name.isdigit() for name in names)


def test_a_held_out_split_is_seeded_disjoint_and_read_as_evaluation_data(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "data", 10, "train.csv")
    full = datasets.build_dataset(csv_path, draft_size=64)
    evaluate = object()  # the evaluation transform, handed to the held-out part only
    train, val, origin = datasets.held_out(full, "split", 0.3, 7, evaluate, draft_size=32)
    assert origin == f"seeded split (seed 7) of {csv_path}: 30% evaluated"
    assert (len(train), len(val)) == (7, 3)
    assert sorted(train.samples + val.samples) == sorted(full.samples) and not set(train.samples) & set(val.samples)
    assert val.transform is evaluate and val.draft_size == 32 and train.draft_size == 64
    again = datasets.held_out(datasets.build_dataset(csv_path), "split", 0.3, 7, None)[1]
    assert again.samples == val.samples  # the same seed, the same images: --eval finds the run's held-out set
    other = datasets.held_out(datasets.build_dataset(csv_path), "split", 0.3, 8, None)[1]
    assert other.samples != val.samples
    row = full.samples.index(val.samples[0]) + 2  # CSV rows are named in errors as before the split
    assert val.describe(0) == f"{val.samples[0][0]} (row {row} of {csv_path})"
    assert val.source == f"{csv_path} (30% held out, seed 7)"


def test_a_pre_decoded_dataset_cannot_be_split():
    from util.data.loaders import SampleDataset

    packed = SampleDataset()
    packed.source = "x.json"
    with pytest.raises(DataError, match=r"^x.json: --test_path split needs a CSV, ImageFolder or image folder"):
        datasets.split_dataset(packed, 0.2)
