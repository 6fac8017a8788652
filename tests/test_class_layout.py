"""The class-folder rule (``class_layout``): one rule, whether a folder is local or behind a URL."""

from __future__ import annotations

from pathlib import Path

from featx.data.worklist import ClassLayout, class_layout, scan_folder


def test_a_flat_folder_is_unlabelled_and_has_no_stray_images():
    assert class_layout(["a.jpg", "b.png"]) == ClassLayout([], [-1, -1], ())


def test_top_level_folders_are_classes_in_sorted_order():
    layout = class_layout(["dog/1.jpg", "cat/2.jpg", "cat/3.jpg"])
    assert layout.class_names == ["cat", "dog"]
    assert layout.labels == [1, 0, 0]
    assert layout.stray == ()


def test_an_image_deep_in_a_class_folder_takes_its_top_level_folder_as_label():
    layout = class_layout(["cat/indoor/night/1.jpg", "dog/2.jpg"])
    assert layout.class_names == ["cat", "dog"]
    assert layout.labels == [0, 1]


def test_images_beside_class_folders_are_stray_and_leave_every_image_unlabelled():
    layout = class_layout(["cat/1.jpg", "stray.jpg", "dog/2.jpg", "other.png"])
    assert layout.class_names == []
    assert layout.labels == [-1, -1, -1, -1]
    assert layout.stray == ("stray.jpg", "other.png")


def test_a_folder_with_no_image_still_counts_as_a_class_when_the_scanner_saw_it():
    layout = class_layout(["dog/1.jpg"], folders=["cat", "dog"])
    assert layout.class_names == ["cat", "dog"]
    assert layout.labels == [1]


def test_an_empty_folder_has_no_classes_and_no_labels():
    assert class_layout([]) == ClassLayout([], [], ())
    assert class_layout([], folders=["cat"]) == ClassLayout(["cat"], [], ())


def test_a_local_scan_follows_the_same_rule(tmp_path: Path):
    for relative in ("dog/1.jpg", "cat/deep/2.jpg", "README.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    images = scan_folder(tmp_path)
    expected = class_layout(["cat/deep/2.jpg", "dog/1.jpg"], folders=["empty"])
    assert images.paths == ["cat/deep/2.jpg", "dog/1.jpg"]
    assert (images.class_names, images.labels) == (expected.class_names, expected.labels)
    assert images.class_names == ["cat", "dog", "empty"]
    (tmp_path / "stray.jpg").write_bytes(b"x")
    assert scan_folder(tmp_path).stray == ("stray.jpg",)
    assert scan_folder(tmp_path).labels == [-1, -1, -1]
