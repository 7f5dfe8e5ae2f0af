"""Tests of the real-data loaders: digits, PASCAL-Part, image folders, the tfds catalog.

Every fixture (tiny .mat annotations, JPEGs, image folders, raw MNIST/CIFAR files) is written
by the tests into tmp_path; nothing is downloaded.
"""
from __future__ import annotations

import gzip
import io
import itertools
import logging
import os
import tarfile

import numpy as np
import pytest
import scipy.io
from PIL import Image

from unmask_jax import data
from unmask_jax.data import digits, image_folder, parts, pascal_part, tfds_catalog
from unmask_jax.data.pascal_part import merge_part_name

# ---------------------------------------------------------------------------------------------
# PASCAL-Part name merging.

# The part names PASCAL-Part uses per class (its part2ind.m); '#' stands for 1..10 (1..20 for
# windows), the numbering of repeated parts.
PASCAL_PART_NAMES = {
    'aeroplane': 'body stern lwing rwing tail engine_# wheel_#',
    'bicycle': 'fwheel bwheel saddle handlebar chainwheel headlight_#',
    'bird': 'head leye reye beak torso neck lwing rwing lleg lfoot rleg rfoot tail',
    'bottle': 'cap body',
    'bus': ('frontside leftside rightside backside roofside leftmirror rightmirror fliplate '
            'bliplate door_# wheel_# headlight_# window_#'),
    'cat': ('head leye reye lear rear nose torso neck lfleg lfpa rfleg rfpa lbleg lbpa rbleg rbpa '
            'tail'),
    'cow': ('head leye reye lear rear muzzle lhorn rhorn torso neck lfuleg lflleg rfuleg rflleg '
            'lbuleg lblleg rbuleg rblleg tail'),
    'dog': ('head leye reye lear rear nose torso neck lfleg lfpa rfleg rfpa lbleg lbpa rbleg rbpa '
            'tail muzzle'),
    'horse': ('head leye reye lear rear muzzle lfho rfho lbho rbho torso neck lfuleg lflleg '
              'rfuleg rflleg lbuleg lblleg rbuleg rblleg tail'),
    'motorbike': 'fwheel bwheel handlebar saddle headlight_#',
    'person': ('head leye reye lear rear lebrow rebrow nose mouth hair torso neck llarm luarm '
               'lhand rlarm ruarm rhand llleg luleg lfoot rlleg ruleg rfoot'),
    'pottedplant': 'pot plant',
    'sheep': ('head leye reye lear rear muzzle lhorn rhorn torso neck lfuleg lflleg rfuleg '
              'rflleg lbuleg lblleg rbuleg rblleg tail'),
    'train': ('head hfrontside hleftside hrightside hbackside hroofside headlight_# coach_# '
              'cfrontside_# cleftside_# crightside_# cbackside_# croofside_#'),
    'tvmonitor': 'screen',
}
PASCAL_PART_NAMES['car'] = PASCAL_PART_NAMES['bus']


def _expand(names: str) -> list[str]:
  out = []
  for n in names.split():
    out += [n.replace('#', str(i)) for i in (1, 2, 10)] if '#' in n else [n]
  return out


@pytest.mark.parametrize('fine, cls, expected', [
    # The two defects of the original substring matching.
    ('headlight_1', 'car', 'headlight'), ('headlight_3', 'train', 'headlight'),
    ('headlight_1', 'motorbike', 'headlight'), ('head', 'train', 'head'),
    ('head', 'person', 'head'), ('handlebar', 'bicycle', 'handlebar'),
    ('handlebar', 'motorbike', 'handlebar'), ('lhand', 'person', 'hand'),
    ('rhand', 'person', 'hand'),
    # Legs (all four families), paws, hooves, horns, feet, eyes, ears, brows, arms, wings.
    ('lleg', 'bird', 'leg'), ('rfleg', 'dog', 'leg'), ('lbleg', 'cat', 'leg'),
    ('lfuleg', 'horse', 'leg'), ('rblleg', 'cow', 'leg'), ('llleg', 'person', 'leg'),
    ('ruleg', 'person', 'leg'), ('lfpa', 'dog', 'paw'), ('rbpa', 'cat', 'paw'),
    ('lbho', 'horse', 'hoof'), ('rfho', 'horse', 'hoof'), ('lhorn', 'sheep', 'horn'),
    ('lfoot', 'bird', 'foot'), ('rfoot', 'person', 'foot'), ('reye', 'cow', 'eye'),
    ('lear', 'dog', 'ear'), ('rebrow', 'person', 'eyebrow'), ('luarm', 'person', 'arm'),
    ('rlarm', 'person', 'arm'), ('lwing', 'bird', 'wing'), ('rwing', 'aeroplane', 'wing'),
    # Train sides (head and coach sides) and vehicle sides.
    ('cfrontside_1', 'train', 'coach_front'), ('cleftside_2', 'train', 'coach_left'),
    ('crightside_10', 'train', 'coach_right'), ('cbackside_1', 'train', 'coach_back'),
    ('croofside_3', 'train', 'coach_top'), ('frontside', 'car', 'frontside'),
    ('leftside', 'bus', 'vehicle_left'), ('rightside', 'car', 'vehicle_right'),
    ('backside', 'car', 'vehicle_back'), ('roofside', 'bus', 'vehicle_top'),
    # Plates, mirrors, numbered parts, wheels.
    ('fliplate', 'car', 'licenseplate'), ('bliplate', 'bus', 'licenseplate'),
    ('plate', 'car', 'licenseplate'), ('leftmirror', 'car', 'mirror'),
    ('door_2', 'bus', 'door'), ('window_17', 'car', 'window'), ('engine_2', 'aeroplane', 'engine'),
    ('wheel_1', 'car', 'wheel'), ('fwheel', 'bicycle', 'wheel'), ('bwheel', 'motorbike', 'wheel'),
    ('chainwheel', 'bicycle', 'wheel'),
    # Kept as they are.
    ('muzzle', 'dog', 'muzzle'), ('beak', 'bird', 'beak'), ('cap', 'bottle', 'cap'),
    ('screen', 'tvmonitor', 'screen'), ('stern', 'aeroplane', 'stern'), ('HEAD', 'dog', 'head'),
    # Dropped: whole carriages, unknown names, substrings, parts outside the class's row.
    ('coach_1', 'train', None), ('headlight_1', 'bicycle', None), ('leftside', 'train', None),
    # Locomotive head sides: dropped, as by the original UnMask code.
    ('hfrontside', 'train', None), ('hroofside', 'train', None),
    ('hfrontside', 'car', None), ('cfrontside_1', 'bus', None), ('frontside', 'person', None),
    ('headx', 'person', None), ('xhead', 'person', None), ('headlights', 'car', None),
    ('handle', 'bicycle', None), ('hands', 'person', None), ('legs', 'dog', None),
    ('lfleg_1', 'dog', None), ('eye', 'person', None), ('platelight', 'car', None),
    ('head', 'boat', None), ('head', 'unknown_class', None), ('', 'person', None),
])
def test_merge_part_name(fine, cls, expected):
  assert merge_part_name(fine, cls) == expected


def test_merge_covers_the_real_part_list():
  """Every PASCAL-Part name merges into its class's row (documented drops aside), and every
  robust part of every class is reachable; exactly 18 leg names exist."""
  dropped = {('train', 'coach'), ('bicycle', 'headlight')} | {
      ('train', f'h{side}side') for side in ('front', 'left', 'right', 'back', 'roof')}
  legs = set()
  for cls, names in PASCAL_PART_NAMES.items():
    reached = set()
    for fine in _expand(names):
      robust = merge_part_name(fine, cls)
      if robust is None:
        assert (cls, fine.split('_')[0]) in dropped, (cls, fine)
        continue
      assert robust in parts.CLASS_PARTS[cls], (cls, fine, robust)
      reached.add(robust)
      if robust == 'leg':
        legs.add(fine)
    assert reached == set(parts.CLASS_PARTS[cls]), cls
  assert len(legs) == 18


# ---------------------------------------------------------------------------------------------
# PASCAL-Part end to end on a fixture.

H, W, SIZE = 40, 48, 32


def _struct(records: list[dict], fields: tuple[str, ...]) -> np.ndarray:
  """A 1xK MATLAB struct array (as scipy.io.savemat writes it)."""
  arr = np.zeros((1, len(records)), dtype=[(f, 'O') for f in fields])
  for i, r in enumerate(records):
    for f in fields:
      arr[f][0, i] = r[f]
  return arr


def _box(y0, y1, x0, x1) -> np.ndarray:
  m = np.zeros((H, W), np.uint8)
  m[y0:y1, x0:x1] = 1
  return m


def _write_mat(path: str, objects: list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]):
  objs = []
  for cls, mask, object_parts in objects:
    p = _struct([{'part_name': n, 'mask': m} for n, m in object_parts], ('part_name', 'mask'))
    objs.append({'class': cls, 'class_ind': np.array([[pascal_part.VOC_CLASSES.index(cls) + 1]]),
                 'mask': mask, 'parts': p})
  anno = _struct([{'imname': os.path.basename(path)[:-4],
                   'objects': _struct(objs, ('class', 'class_ind', 'mask', 'parts'))}],
                 ('imname', 'objects'))
  scipy.io.savemat(path, {'anno': anno})


def _write_jpeg(path: str, seed: int, shape=(H, W)):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(path, quality=95)


def _ids_in(split: str, n: int, start: int) -> list[str]:
  ids = (f'2010_{i:06d}' for i in itertools.count(start))
  return list(itertools.islice((i for i in ids if pascal_part.split_of(i) == split), n))


FULL = _box(0, H, 0, W)
# image name -> (objects, expected robust parts in the train split or None when skipped)
_PERSON = [('person', FULL, [('head', _box(0, 20, 10, 40)), ('leye', _box(5, 10, 15, 22)),
                             ('lhand', _box(22, 30, 0, 8)), ('llleg', _box(30, 40, 20, 30)),
                             ('hair', _box(0, 1, 0, 1))])]  # 1 pixel: erased after resizing
_CAR = [('car', FULL, [('leftside', _box(10, 40, 0, 48)), ('headlight_1', _box(15, 22, 2, 10)),
                       ('wheel_1', _box(30, 40, 30, 42)), ('fliplate', _box(24, 30, 20, 30))])]
_MOTORBIKE = [('motorbike', FULL, [('handlebar', _box(0, 8, 0, 20)),
                                   ('fwheel', _box(20, 40, 0, 20)),
                                   ('headlight_1', _box(8, 14, 20, 28))])]
_TRAIN = [('train', FULL, [('coach_1', _box(0, 40, 24, 48)), ('head', _box(0, 40, 0, 24)),
                           ('hfrontside', _box(0, 40, 0, 10)), ('cleftside_1', _box(0, 40, 24, 40)),
                           ('headlight_1', _box(2, 8, 2, 8))])]
_DOG = [('dog', FULL, [('lfpa', _box(34, 40, 0, 8)), ('lbleg', _box(20, 34, 30, 40)),
                       ('muzzle', _box(0, 10, 0, 12))])]
_MULTI = [('person', _box(0, 40, 0, 30), [('head', _box(0, 10, 0, 10))]),
          ('dog', _box(0, 20, 30, 48), [('muzzle', _box(0, 6, 30, 40))])]
_BOAT = [('boat', FULL, [])]
CLS = {c: i for i, c in enumerate(pascal_part.CLASSES)}
_EXPECTED_PARTS = {
    'person': {'head', 'eye', 'hand', 'leg'},
    'car': {'vehicle_left', 'headlight', 'wheel', 'licenseplate'},
    'motorbike': {'handlebar', 'wheel', 'headlight'},
    'train': {'head', 'coach_left', 'headlight'},      # hfrontside dropped
    'dog': {'paw', 'leg', 'muzzle'},
}


@pytest.fixture(scope='module')
def pascal_dir(tmp_path_factory):
  """A manual directory: 4 good train images, 1 validation, 1 test, and broken ones."""
  root = tmp_path_factory.mktemp('pascal')
  manual = root / 'downloads' / 'manual' / 'pascal_part'
  (manual / 'JPEGImages').mkdir(parents=True)
  (manual / 'Annotations_Part').mkdir()
  train_ids = _ids_in('train', 9, 0)
  specs = dict(zip(train_ids, [_PERSON, _CAR, _MOTORBIKE, _TRAIN, _MULTI, _BOAT,
                               'garbage', 'no_jpeg', 'bad_jpeg']))
  specs[_ids_in('validation', 1, 0)[0]] = _DOG
  specs[_ids_in('test', 1, 0)[0]] = _PERSON
  for k, (image_id, objects) in enumerate(specs.items()):
    mat = str(manual / 'Annotations_Part' / f'{image_id}.mat')
    jpg = str(manual / 'JPEGImages' / f'{image_id}.jpg')
    if objects == 'garbage':
      with open(mat, 'wb') as f:
        f.write(b'MATLAB 5.0 MAT-file, but truncated')
      _write_jpeg(jpg, k)
      continue
    if objects == 'bad_jpeg':
      _write_mat(mat, _DOG)
      with open(jpg, 'wb') as f:
        f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
      continue
    _write_mat(mat, _PERSON if objects == 'no_jpeg' else objects)
    if objects != 'no_jpeg':
      _write_jpeg(jpg, k)
  return {'data_dir': str(root), 'ids': train_ids}


def _part_set(presence: np.ndarray) -> set[str]:
  return {parts.PART_NAMES[i] for i in np.flatnonzero(presence)}


def _check_mask_presence(ds):
  for mask, presence in zip(ds.arrays['mask'], ds.arrays['parts']):
    in_mask = np.zeros(parts.NUM_PARTS, np.uint8)
    ids = np.unique(mask)
    in_mask[ids[ids > 0] - 1] = 1
    np.testing.assert_array_equal(in_mask, presence)


def test_read_annotation_layout(pascal_dir):
  mat = os.path.join(pascal_dir['data_dir'], 'downloads', 'manual', 'pascal_part',
                     'Annotations_Part', pascal_dir['ids'][4] + '.mat')
  objects = pascal_part.read_annotation(mat)
  assert [o['class'] for o in objects] == ['person', 'dog']
  assert objects[0]['parts'][0][0] == 'head' and objects[0]['parts'][0][1].shape == (H, W)
  assert pascal_part.object_label(objects, allow_multiclass=False) == (None, 'multiclass')
  assert pascal_part.object_label(objects, allow_multiclass=True) == ('person', '')


def test_pascal_part_end_to_end(pascal_dir, caplog):
  caplog.set_level(logging.WARNING)
  train = data.load('pascal_part', 'train', data_dir=pascal_dir['data_dir'], size=SIZE)
  assert train.class_names == pascal_part.CLASSES and len(train.class_names) == 16
  assert train.arrays['image'].shape == (4, SIZE, SIZE, 3)
  assert train.arrays['image'].dtype == np.uint8
  assert train.arrays['mask'].shape == (4, SIZE, SIZE) and train.arrays['mask'].dtype == np.uint8
  assert train.arrays['parts'].shape == (4, parts.NUM_PARTS)
  assert train.arrays['label'].dtype == np.int32
  got = {train.class_names[y]: _part_set(p)
         for y, p in zip(train.arrays['label'], train.arrays['parts'])}
  assert got == {c: _EXPECTED_PARTS[c] for c in ('person', 'car', 'motorbike', 'train')}
  _check_mask_presence(train)
  # The eye lies on the head and the headlight on the car's side: both stay visible.
  person = train.arrays['mask'][list(train.arrays['label']).index(CLS['person'])]
  assert (person == parts.part_id('eye') + 1).sum() > 0
  # Broken and skipped files are reported, by name, in the source and the log.
  ids = pascal_dir['ids']
  for reason, name in [('malformed_annotation', ids[6] + '.mat'), ('multiclass', ids[4]),
                       ('no_labelled_class', ids[5]), ('missing_image', ids[7] + '.jpg'),
                       ('unreadable_image', ids[8] + '.jpg')]:
    assert f'{reason}=1 ({name})' in train.source
  assert any('malformed_annotation' in r.getMessage() for r in caplog.records)
  validation = data.load('pascal_part', 'validation', data_dir=pascal_dir['data_dir'], size=SIZE)
  test = data.load('pascal_part', 'test', data_dir=pascal_dir['data_dir'], size=SIZE)
  assert [validation.class_names[y] for y in validation.arrays['label']] == ['dog']
  assert _part_set(validation.arrays['parts'][0]) == _EXPECTED_PARTS['dog']
  assert [test.class_names[y] for y in test.arrays['label']] == ['person']
  assert 'skipped' not in validation.source and 'skipped' not in test.source
  _check_mask_presence(validation)
  # A second load is served from the cache and gives identical arrays.
  again = data.load('pascal_part', 'train', data_dir=pascal_dir['data_dir'], size=SIZE)
  assert again.fingerprint() == train.fingerprint() and again.source == train.source


def test_pascal_part_allow_multiclass(pascal_dir):
  train = data.load('pascal_part', 'train', data_dir=pascal_dir['data_dir'], size=SIZE,
                    allow_multiclass=True)
  labels = sorted(train.class_names[y] for y in train.arrays['label'])
  # The person covers more pixels than the dog, so the multi-class image is a person.
  assert labels == ['car', 'motorbike', 'person', 'person', 'train']
  assert 'multiclass' not in train.source
  multi = [p for y, p in zip(train.arrays['label'], train.arrays['parts'])
           if _part_set(p) == {'head', 'muzzle'}]
  assert len(multi) == 1  # parts of both objects are kept
  _check_mask_presence(train)


def test_pascal_part_missing_manual_dir(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    data.load('pascal_part', 'train', data_dir=str(tmp_path))
  msg = str(e.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual', 'pascal_part') in msg
  assert 'JPEGImages' in msg and 'Annotations_Part' in msg and '.mat' in msg


def test_presence_from_mask_erases_slivers():
  mask = np.zeros((10, 10), np.uint8)
  mask[:3, :3] = 4
  mask[9, 9] = 7
  out, presence = pascal_part.presence_from_mask(mask, min_pixels=5)
  assert set(np.unique(out)) == {0, 4}
  assert np.flatnonzero(presence).tolist() == [3]


# ---------------------------------------------------------------------------------------------
# Image folders.

def _make_folder(root, counts: dict[str, int], size=(12, 10)):
  for k, (cls, n) in enumerate(counts.items()):
    folder = os.path.join(root, cls)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
      ext = ('.png', '.jpg', '.JPEG', '.bmp')[i % 4]
      arr = np.full(size + (3,), 20 * k + i, np.uint8)
      Image.fromarray(arr).save(os.path.join(folder, f'{i:03d}{ext}'))


def test_image_folder_flat(tmp_path):
  root = str(tmp_path / 'flickr')
  _make_folder(root, {'cat': 15, 'dog': 15})
  os.makedirs(os.path.join(root, '.hidden'))  # ignored
  with open(os.path.join(root, 'dog', 'notes.txt'), 'w') as f:
    f.write('not an image; ignored by extension')
  with open(os.path.join(root, 'dog', 'broken.jpg'), 'wb') as f:
    f.write(b'\x00\x01 broken')
  kw = dict(data_dir=str(tmp_path / 'cache'), root=root, size=20)
  splits = {s: data.load('image_folder', s, **kw) for s in image_folder.SPLITS}
  assert sum(len(d) for d in splits.values()) == 30
  assert len(splits['train']) > len(splits['validation'])
  for d in splits.values():
    assert d.class_names == ('cat', 'dog')
    assert d.arrays['image'].shape[1:] == (20, 20, 3) and d.arrays['image'].dtype == np.uint8
  broken_split = image_folder.hash_split('dog/broken.jpg')
  assert 'unreadable_image=1 (dog/broken.jpg)' in splits[broken_split].source
  # Deterministic, and an explicit class order relabels.
  again = data.load('image_folder', 'train', **kw)
  assert again.fingerprint() == splits['train'].fingerprint()
  swapped = data.load('image_folder', 'train', **kw, classes=['dog', 'cat'])
  np.testing.assert_array_equal(np.sort(1 - swapped.arrays['label']),
                                np.sort(splits['train'].arrays['label']))
  only_dog = data.load('image_folder', 'test', **kw, classes=['dog'])
  assert only_dog.class_names == ('dog',) and set(only_dog.arrays['label']) <= {0}


def test_image_folder_split_dirs(tmp_path):
  root = tmp_path / 'imagenet_subset'
  _make_folder(str(root / 'train'), {'n01': 5, 'n02': 4})
  _make_folder(str(root / 'val'), {'n01': 2, 'n02': 3})
  _make_folder(str(root / 'test'), {'n02': 1})  # a class may be absent from a split
  kw = dict(data_dir=str(tmp_path / 'cache'), root=str(root), size=8)
  got = {s: data.load('image_folder', s, **kw) for s in image_folder.SPLITS}
  assert [len(got[s]) for s in image_folder.SPLITS] == [9, 5, 1]
  assert sorted(got['validation'].arrays['label'].tolist()) == [0, 0, 1, 1, 1]
  assert got['test'].arrays['label'].tolist() == [1]
  assert got['train'].class_names == ('n01', 'n02')
  # Without a validation folder, asking for it is a clear error.
  os.rename(root / 'val', tmp_path / 'moved')
  with pytest.raises(FileNotFoundError, match='validation'):
    data.load('image_folder', 'validation', **kw)


def test_image_folder_errors(tmp_path):
  root = tmp_path / 'imgs'
  _make_folder(str(root), {'a': 2})
  os.makedirs(root / 'b')
  with pytest.raises(ValueError, match=r"imgs/b' contains no images"):
    data.load('image_folder', 'train', data_dir=str(tmp_path), root=str(root))
  with pytest.raises(ValueError, match='not found'):
    data.load('image_folder', 'train', data_dir=str(tmp_path), root=str(root), classes=['zz'])
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.load('image_folder', 'train', data_dir=str(tmp_path), root=str(tmp_path / 'nope'))


def test_image_folder_empty_split_keeps_shapes(tmp_path):
  root = tmp_path / 'one'
  _make_folder(str(root), {'a': 1})
  kw = dict(data_dir=str(tmp_path / 'cache'), root=str(root), size=6)
  sizes = {s: data.load('image_folder', s, **kw) for s in image_folder.SPLITS}
  assert sum(len(d) for d in sizes.values()) == 1
  for d in sizes.values():
    assert d.arrays['image'].shape[1:] == (6, 6, 3) and d.arrays['label'].dtype == np.int32


def test_image_folder_all_files_of_a_split_unreadable(tmp_path):
  root = tmp_path / 'bad'
  os.makedirs(root / 'a')
  with open(root / 'a' / 'x.png', 'wb') as f:
    f.write(b'not a png')
  with pytest.raises(ValueError, match=r'unreadable_image=1 \(a/x.png\)'):
    data.load('image_folder', 'train', data_dir=str(tmp_path / 'cache'), root=str(root))


# ---------------------------------------------------------------------------------------------
# Digits.

def test_digits_splits():
  got = {s: data.load('digits', s, data_dir='unused') for s in ('train', 'validation', 'test')}
  assert sum(len(d) for d in got.values()) == 1797
  for d in got.values():
    assert d.arrays['image'].shape[1:] == (8, 8, 1) and d.arrays['image'].dtype == np.uint8
    assert d.arrays['label'].dtype == np.int32 and d.class_names == tuple('0123456789')
  assert got['train'].arrays['image'].max() == 255
  # Stratified: every class is split 60/20/20 (to rounding).
  full = np.bincount(np.concatenate([d.arrays['label'] for d in got.values()]), minlength=10)
  for s, frac in (('train', 0.6), ('validation', 0.2), ('test', 0.2)):
    per_class = np.bincount(got[s].arrays['label'], minlength=10)
    assert np.all(np.abs(per_class - frac * full) <= 1), s
  # Disjoint, deterministic, and the seed matters.
  idx = {s: set(digits.split_indices(digits._all()[1], s, 0).tolist()) for s in got}
  assert not (idx['train'] & idx['test']) and not (idx['train'] & idx['validation'])
  assert data.load('digits', 'test', data_dir='x').fingerprint() == got['test'].fingerprint()
  reseeded = data.load('digits', 'test', data_dir='x', seed=1)
  assert reseeded.fingerprint() != got['test'].fingerprint()


# ---------------------------------------------------------------------------------------------
# tfds catalog: tfds' mock data (the tfds-builder path) and raw files (the TensorFlow-free path).

@pytest.mark.parametrize('name, shape', [('mnist', (28, 28, 1)), ('fashion_mnist', (28, 28, 1)),
                                         ('cifar10', (32, 32, 3))])
def test_catalog_tfds_mock(name, shape, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds
  # The mock makes download_and_prepare a no-op; say TensorFlow is there so the loader lets tfds
  # "prepare" (without TensorFlow it refuses before any download).
  monkeypatch.setattr(tfds_catalog, '_tensorflow_installed', lambda: True)
  with tfds.testing.mock_data(num_examples=20):
    got = {s: data.load(name, s, data_dir=str(tmp_path), backend='tfds')
           for s in ('train', 'validation', 'test')}
  assert [len(got[s]) for s in ('train', 'validation', 'test')] == [18, 2, 20]
  for d in got.values():
    assert d.arrays['image'].shape[1:] == shape and d.arrays['image'].dtype == np.uint8
    assert d.arrays['label'].dtype == np.int32
    assert d.arrays['label'].min() >= 0 and d.arrays['label'].max() < 10
    assert d.source.startswith(f'{name}/tfds/')
  # The mock's records are a deterministic function of the index: validation is the tail.
  np.testing.assert_array_equal(got['validation'].arrays['image'], got['test'].arrays['image'][18:])


def _idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, '>u4').tobytes()
  return header + arr.astype(np.uint8).tobytes()


def test_catalog_raw_mnist(tmp_path):
  folder = tfds_catalog.manual_dir(str(tmp_path), 'mnist')
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
  train_y = np.arange(30) % 10
  test_x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
  test_y = np.arange(7)
  for fname, arr in [('train-images-idx3-ubyte.gz', train_x),
                     ('train-labels-idx1-ubyte.gz', train_y),
                     ('t10k-images-idx3-ubyte.gz', test_x)]:
    with gzip.open(os.path.join(folder, fname), 'wb') as f:
      f.write(_idx_bytes(arr))
  with open(os.path.join(folder, 't10k-labels-idx1-ubyte'), 'wb') as f:  # uncompressed is fine
    f.write(_idx_bytes(test_y))
  train = data.load('mnist', 'train', data_dir=str(tmp_path))  # auto: finds the raw files
  validation = data.load('mnist', 'validation', data_dir=str(tmp_path))
  test = data.load('mnist', 'test', data_dir=str(tmp_path), backend='raw')
  np.testing.assert_array_equal(train.arrays['image'][..., 0], train_x[:27])
  np.testing.assert_array_equal(validation.arrays['image'][..., 0], train_x[27:])
  np.testing.assert_array_equal(validation.arrays['label'], train_y[27:])
  np.testing.assert_array_equal(test.arrays['image'][..., 0], test_x)
  assert test.arrays['label'].tolist() == list(range(7)) and train.source == 'mnist/raw/train'


def test_catalog_raw_cifar10(tmp_path):
  folder = tfds_catalog.manual_dir(str(tmp_path), 'cifar10')
  os.makedirs(folder)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (6 * 4, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(24) % 10
  with tarfile.open(os.path.join(folder, 'cifar-10-binary.tar.gz'), 'w:gz') as tar:
    names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
    for b, fname in enumerate(names):
      rows = [np.concatenate([[labels[i]], images[i].transpose(2, 0, 1).ravel()])
              for i in range(4 * b, 4 * b + 4)]
      blob = np.asarray(rows, np.uint8).tobytes()
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{fname}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  train = data.load('cifar10', 'train', data_dir=str(tmp_path))
  validation = data.load('cifar10', 'validation', data_dir=str(tmp_path))
  test = data.load('cifar10', 'test', data_dir=str(tmp_path))
  np.testing.assert_array_equal(train.arrays['image'], images[:18])  # planar RGB -> HWC
  np.testing.assert_array_equal(validation.arrays['image'], images[18:20])
  np.testing.assert_array_equal(test.arrays['image'], images[20:])
  np.testing.assert_array_equal(test.arrays['label'], labels[20:])
  assert train.class_names[0] == 'airplane'


def test_catalog_missing_files_error(tmp_path, monkeypatch):
  # With TensorFlow missing nothing is attempted online; the error says what to provide.
  monkeypatch.setattr(tfds_catalog, '_tensorflow_installed', lambda: False)
  for backend in ('auto', 'tfds', 'raw'):
    with pytest.raises(FileNotFoundError) as e:
      data.load('fashion_mnist', 'train', data_dir=str(tmp_path), backend=backend)
    msg = str(e.value)
    assert "'fashion_mnist'" in msg and 'train-images-idx3-ubyte.gz' in msg
    assert tfds_catalog.manual_dir(str(tmp_path), 'fashion_mnist') in msg
    assert 'TFDS_DATA_DIR' in msg and 'array_record' in msg


# ---------------------------------------------------------------------------------------------
# Registry.

def test_registry_names_and_errors(tmp_path):
  for name in ('digits', 'pascal_part', 'image_folder', 'mnist', 'fashion_mnist', 'cifar10'):
    assert name in data.DATASETS
    assert callable(data.DATASETS.get(name))
  with pytest.raises(KeyError, match='Did you mean'):
    data.load('mnsit', 'train', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='Unknown split'):
    data.load('digits', 'dev', data_dir=str(tmp_path))
  with pytest.raises(TypeError):
    data.load('digits', 'train', data_dir=str(tmp_path), sed=1)
