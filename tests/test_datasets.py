import pytest


from util import datasets
from util.datasets import DataError, build_dataset
from util.transforms import build_transform


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


