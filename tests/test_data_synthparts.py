import hashlib
import json
import os

import numpy as np
import pytest

from unmask_jax import data, registry
from unmask_jax.data import parts, pipeline, synthparts, viz

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'reference', 'class_parts.json')
TINY = dict(train_per_class=6, validation_per_class=3, test_per_class=3)


def test_packaged_table_matches_shared_reference():
  if not os.path.exists(SHARED):
    pytest.skip('../shared not beside the checkout')
  with open(SHARED) as f:
    ref = json.load(f)
  assert {c: tuple(p) for c, p in ref['class_parts'].items()} == parts.CLASS_PARTS
  assert {c: tuple(p) for c, p in ref['class_sets'].items()} == parts.CLASS_SETS


@pytest.mark.parametrize('name,count,ov', [('cs3a', 29, 0.0689), ('cs3b', 18, 0.50),
                                           ('cs5a', 34, 0.2353), ('cs5b', 34, 0.2941)])
def test_overlap_reproduces_paper_table_ii(name, count, ov):
  n, o = parts.overlap(parts.class_set(name))
  assert n == count
  assert o == pytest.approx(ov, abs=1e-4)  # the paper truncates 6.897% to 6.89%


def test_unknown_class_set_and_missing_class_errors():
  with pytest.raises(KeyError, match='cs3a'):
    parts.class_set('cs9')
  with pytest.raises(KeyError, match='no entry'):
    parts.parts_matrix(['person', 'unicorn'])


def test_parts_matrix_rows_match_table():
  v = parts.parts_matrix(['car', 'train'])
  assert v[0].sum() == len(parts.CLASS_PARTS['car'])
  assert v[0, parts.part_id('headlight')] == 1 and v[1, parts.part_id('headlight')] == 1
  assert v[0, parts.part_id('head')] == 0 and v[1, parts.part_id('head')] == 1


def test_every_part_has_a_distinct_glyph():
  glyphs = {synthparts.glyph_of(i)[:2] for i in range(parts.NUM_PARTS)}
  assert len(glyphs) == parts.NUM_PARTS


def test_shared_part_drawn_alike_across_classes():
  # The glyph of a part depends on the part only, never on the class it is drawn in.
  for name in ('eye', 'head', 'leg', 'headlight'):
    pid = parts.part_id(name)
    assert synthparts.glyph_of(pid) == synthparts.glyph_of(pid)
  # And 'eye' pixels look alike in person and dog images: same hue family.
  hues = {}
  for cls in ('person', 'dog', 'bird'):
    for i in range(40):
      rng = np.random.default_rng([1, i, len(cls)])
      img, mask, _ = synthparts.render_example(rng, cls)
      sel = mask == parts.part_id('eye') + 1
      if sel.sum() > 8:
        import colorsys
        rgb = img[sel].astype(float).max(0) / 255
        hues.setdefault(cls, []).append(colorsys.rgb_to_hsv(*rgb)[0])
  means = [np.median(v) for v in hues.values()]
  assert len(means) == 3 and max(means) - min(means) < 0.08


def test_generation_is_deterministic_bytes():
  a = list(synthparts.generate_split('train', 5, seed=3))
  b = list(synthparts.generate_split('train', 5, seed=3))
  c = list(synthparts.generate_split('train', 5, seed=4))
  digest = lambda exs: hashlib.sha1(b''.join(e['image'].tobytes() + e['mask'].tobytes()
                                             for _, e in exs)).hexdigest()
  assert digest(a) == digest(b) != digest(c)


def test_masks_consistent_with_presence_and_class():
  for _, ex in synthparts.generate_split('validation', 10, seed=0):
    ids = set(np.unique(ex['mask'])) - {0}
    assert ids == {i + 1 for i in np.flatnonzero(ex['parts'])}
    assert ex['parts'].sum() >= 2
    cls = parts.SYNTH_CLASSES[ex['label']]
    allowed = {parts.part_id(p) for p in parts.CLASS_PARTS[cls]}
    assert set(np.flatnonzero(ex['parts'])) <= allowed
    counts = np.bincount(ex['mask'].ravel(), minlength=parts.NUM_PARTS + 1)[1:]
    assert np.all(counts[ex['parts'] > 0] >= 5)


def test_image_size_too_small_is_an_error():
  with pytest.raises(ValueError, match='too small'):
    synthparts.render_example(np.random.default_rng(0), 'dog', size=8)


def test_tfds_build_and_load(tmp_path):
  ds = data.load('synthparts', 'train', data_dir=str(tmp_path), **TINY)
  assert ds.arrays['image'].shape == (36, 32, 32, 3) and ds.arrays['image'].dtype == np.uint8
  assert ds.arrays['mask'].shape == (36, 32, 32)
  assert ds.arrays['parts'].shape == (36, parts.NUM_PARTS)
  assert np.bincount(ds.arrays['label']).tolist() == [6] * 6
  again = data.load('synthparts', 'train', data_dir=str(tmp_path), **TINY)
  assert again.fingerprint() == ds.fingerprint()
  test = data.load('synthparts', 'test', data_dir=str(tmp_path), **TINY)
  assert test.fingerprint() != ds.fingerprint()
  # Records come back in tfds order; every generated example is there exactly once.
  gen = sorted(e['image'].tobytes() for _, e in synthparts.generate_split('train', 6))
  assert sorted(x.tobytes() for x in ds.arrays['image']) == gen
  big = data.load('synthparts', 'validation', data_dir=str(tmp_path), size=64, **TINY)
  assert big.image_shape == (64, 64, 3)


def test_select_classes_relabels_in_class_set_order(tmp_path):
  ds = data.load('synthparts', 'validation', data_dir=str(tmp_path), **TINY)
  sub = data.select_classes(ds, parts.class_set('cs3b'))
  assert sub.class_names == ('person', 'dog', 'bird') and len(sub) == 9
  assert sorted(set(sub.arrays['label'].tolist())) == [0, 1, 2]
  person = ds.arrays['image'][ds.arrays['label'] == parts.SYNTH_CLASSES.index('person')]
  np.testing.assert_array_equal(sub.arrays['image'][sub.arrays['label'] == 0], person)
  with pytest.raises(KeyError, match='not in dataset'):
    data.select_classes(ds, ['cat'])


def test_registry_unknown_dataset_lists_valid_names():
  with pytest.raises(KeyError) as e:
    data.load('synthpart', 'train', data_dir='x')
  assert 'synthparts' in str(e.value) and 'digits' in str(e.value) and 'Did you mean' in str(e.value)


def test_spec_parsing():
  assert registry.parse_spec('pgd_linf(eps=8/255, steps=20)') == ('pgd_linf', {'eps': 8 / 255, 'steps': 20})
  assert registry.parse_spec('kde') == ('kde', {})
  assert registry.parse_spec("m(a=-1, b=(1, 2), c='x', d=True)") == ('m', {'a': -1, 'b': (1, 2), 'c': 'x', 'd': True})
  for bad in ('pgd(', 'pgd(1)', 'pgd(eps=__import__("os"))', 'a.b(x=1)'):
    with pytest.raises(ValueError):
      registry.parse_spec(bad)


def test_batches_fixed_shape_pad_and_drop():
  arrays = {'image': np.arange(10 * 2).reshape(10, 2), 'label': np.arange(10)}
  padded = list(pipeline.batches(arrays, 4))
  assert [b['image'].shape for b in padded] == [(4, 2)] * 3
  assert padded[-1]['valid'].tolist() == [True, True, False, False]
  assert np.concatenate([b['label'][b['valid']] for b in padded]).tolist() == list(range(10))
  dropped = list(pipeline.batches(arrays, 4, remainder='drop', seed=0))
  assert len(dropped) == 2 and all(b['valid'].all() for b in dropped)
  e0 = np.concatenate([b['label'] for b in pipeline.batches(arrays, 5, seed=1, epoch=0)])
  e0b = np.concatenate([b['label'] for b in pipeline.batches(arrays, 5, seed=1, epoch=0)])
  e1 = np.concatenate([b['label'] for b in pipeline.batches(arrays, 5, seed=1, epoch=1)])
  assert e0.tolist() == e0b.tolist() != e1.tolist() and sorted(e0.tolist()) == list(range(10))
  resumed = [b['label'].tolist() for b in pipeline.batches(arrays, 5, seed=1, epoch=0, start=1)]
  assert resumed == [e0[5:].tolist()]


def test_validate_images_errors():
  ok = np.zeros((2, 4, 4, 3), np.float32)
  pipeline.validate_images(ok, channels=3)
  with pytest.raises(ValueError, match='rank 4'):
    pipeline.validate_images(ok[0])
  with pytest.raises(ValueError, match='channel'):
    pipeline.validate_images(ok, channels=1)
  with pytest.raises(ValueError, match='divide by 255'):
    pipeline.validate_images(ok + 200.0)
  with pytest.raises(ValueError, match='NaN'):
    pipeline.validate_images(ok * np.nan)
  with pytest.raises(ValueError, match='range'):
    pipeline.validate_labels(np.array([0, 3]), 3)


def test_example_grid_png(tmp_path):
  ds = data.load('synthparts', 'validation', data_dir=str(tmp_path), **TINY)
  path = viz.save_example_grid(ds, str(tmp_path / 'grid.png'), per_class=2)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_viz_command_writes_png(tmp_path):
  out = viz.main(['--out', str(tmp_path / 'g.png'), '--data_dir', str(tmp_path), '--split', 'test',
                  '--per_class', '1'])
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
