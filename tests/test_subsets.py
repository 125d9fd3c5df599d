"""loaders.subsets: the official SimCLR 1 % list mapped onto an ImageFolder and a .beton manifest,
one-line errors for missing names, seeded class-balanced draws, and the list file every backend reads."""
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders import subsets
from loaders.sources.folders import read_file_list

SUBSETS_DIR = Path(__file__).resolve().parents[2] / "shared" / "imagenet_subsets"
ONE_PCT = SUBSETS_DIR / "1percent.txt"


def official_names(n=None):
    if not ONE_PCT.is_file():
        pytest.skip(f"official subset lists missing: {SUBSETS_DIR} "
                    f"(copy google-research/simclr imagenet_subsets/ there)")
    names = [ln.strip() for ln in ONE_PCT.read_text().splitlines() if ln.strip()]
    return names if n is None else names[:n]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """An ImageFolder holding the first 200 names of the official 1 % list (symlinks to one tiny JPEG),
    each in the synset folder its name starts with, plus one extra image per class not in the list."""
    names = official_names(200)
    root = tmp_path_factory.mktemp("fake_imagenet")
    jpeg = root.parent / "one.JPEG"
    Image.new("RGB", (8, 8), (120, 30, 200)).save(jpeg)
    for name in names:
        d = root / subsets.synset(name)
        d.mkdir(exist_ok=True)
        os.symlink(jpeg, d / name)
    for d in root.iterdir():
        os.symlink(jpeg, d / f"{d.name}_999999999.JPEG")
    return root, names


def test_official_list_maps_onto_image_folder(fake_imagenet, tmp_path):
    root, names = fake_imagenet
    lst = tmp_path / "first200.txt"
    lst.write_text("\n".join(names) + "\n")
    entries = subsets.map_names_to_folder(subsets.read_names(lst), root)
    assert len(entries) == 200
    classes = sorted(p.name for p in root.iterdir())
    for rel, label in entries:
        folder, name = rel.split("/")
        assert folder == subsets.synset(name) and classes[label] == folder and name in names
    assert [lab for _, lab in entries] == sorted(lab for _, lab in entries)  # class-major order
    # the CLI writes the list file that data.file_list takes; the loaders' reader agrees with it
    out = tmp_path / "sub.txt"
    assert subsets.main([str(root), "--list", str(lst), "--out", str(out)]) == 0
    samples, cls = read_file_list(out, root)
    assert len(samples) == 200 and cls == classes
    assert {os.path.relpath(p, root) for p, _ in samples} == {rel for rel, _ in entries}


def test_full_official_list_reports_missing_names_in_one_line(fake_imagenet, capsys, tmp_path):
    root, _ = fake_imagenet
    total = len(set(official_names()))
    with pytest.raises(subsets.SubsetError) as e:
        subsets.map_names_to_folder(subsets.read_names(ONE_PCT), root, str(ONE_PCT))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{total - 200} of {total} names")
    assert msg.count(".JPEG") == 3  # a few examples, not thousands
    assert subsets.main([str(root), "--list", str(ONE_PCT), "--out", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{total - 200} of {total} names" in err
    assert not (tmp_path / "x.txt").exists()


def test_names_without_synset_prefix_match_anywhere(image_folder, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("n00000002_3.JPEG\n# a comment\nn00000000/n00000000_1.JPEG\n")
    entries = subsets.map_names_to_folder(subsets.read_names(lst), image_folder)
    assert entries == [("n00000000/n00000000_1.JPEG", 0), ("n00000002/n00000002_3.JPEG", 2)]
    # names that are not ImageNet-style (no synset folder of that name): matched by file name, must be unique
    root = tmp_path / "plain"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "a" / "1.jpg")
    Image.new("RGB", (4, 4)).save(root / "b" / "2.jpg")
    Image.new("RGB", (4, 4)).save(root / "b" / "1.jpg")
    assert subsets.map_names_to_folder(["2.jpg"], root) == [("b/2.jpg", 1)]
    with pytest.raises(subsets.SubsetError, match="matches 2 files"):
        subsets.map_names_to_folder(["1.jpg"], root)


def test_balanced_draw_is_seeded_balanced_and_covers_every_class():
    labels = np.repeat(np.arange(5), [100, 40, 7, 1, 300])
    a = subsets.balanced_draw(labels, 0.1, seed=0)
    assert np.array_equal(a, subsets.balanced_draw(labels, 0.1, seed=0))
    assert not np.array_equal(a, subsets.balanced_draw(labels, 0.1, seed=1))
    counts = Counter(labels[a].tolist())
    assert counts == {0: 10, 1: 4, 2: 1, 3: 1, 4: 30}  # round(0.1 * n_c), at least one
    assert np.all(np.diff(a) > 0)
    tiny = subsets.balanced_draw(labels, 1e-4, seed=3)
    assert Counter(labels[tiny].tolist()) == {c: 1 for c in range(5)}
    # the draw depends on the labels, not on the order the samples come in
    perm = np.random.default_rng(0).permutation(len(labels))
    b = subsets.balanced_draw(labels[perm], 0.1, seed=0)
    assert Counter(labels[perm][b].tolist()) == counts
    with pytest.raises(subsets.SubsetError):
        subsets.balanced_draw(labels, 0.0, seed=0)


def test_fraction_cli_on_image_folder_feeds_the_torch_loader(image_folder, tmp_path):
    import loaders
    out = tmp_path / "half.txt"
    assert subsets.main([image_folder, "--fraction", "0.5", "--seed", "7", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 12 and Counter(ln.split()[1] for ln in lines) == {str(c): 3 for c in range(4)}
    cfg = loaders.LoaderConfig(path=image_folder, file_list=str(out), augment="eval", image_size=16,
                               batch_size=4, num_workers=0, train=False)
    ld = loaders.build(cfg)
    assert len(ld.samples) == 12 and len(ld) == 3
    seen = np.concatenate([b.labels.numpy() for b in ld])
    assert sorted(seen.tolist()) == sorted(int(ln.split()[1]) for ln in lines)


def _fake_beton(tmp_path, files, classes):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    (tmp_path / "train.manifest.json").write_text(json.dumps({"files": files, "classes": classes}))
    return beton


def test_official_names_map_onto_a_beton_manifest(tmp_path):
    names = official_names(50)
    files = [f"{subsets.synset(n)}/{n}" for n in names]
    files += [f"{subsets.synset(n)}/{subsets.synset(n)}_extra.JPEG" for n in names[:10]]
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))]  # .beton order is not sorted
    classes = sorted({f.split("/")[0] for f in files})
    beton = _fake_beton(tmp_path, files, classes)
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(names[:20]) + "\n")
    entries, idx = subsets.make_subset(beton, str(lst))
    assert len(idx) == 20 and np.all(np.diff(idx) > 0)
    assert {files[i] for i in idx} == {f"{subsets.synset(n)}/{n}" for n in names[:20]}
    assert [classes.index(files[i].split("/")[0]) for i in idx] == [lab for _, lab in entries]
    # the written list, read back against the manifest, gives the same .beton indices
    out = tmp_path / "sub.txt"
    assert subsets.main([str(beton), "--list", str(lst), "--out", str(out)]) == 0
    assert np.array_equal(subsets.beton_indices(beton, out), idx)
    assert [int(x) for x in (tmp_path / "sub.indices").read_text().split()] == idx.tolist()
    with pytest.raises(subsets.SubsetError, match=r"^1 of 21 names"):
        subsets.map_names_to_manifest(names[:20] + ["n99999999_1.JPEG"], beton)
    # a balanced draw over the manifest
    _, drawn = subsets.make_subset(beton, fraction=0.5, seed=0)
    assert len(drawn) == sum(max(1, round(0.5 * c)) for c in Counter(f.split("/")[0] for f in files).values())
