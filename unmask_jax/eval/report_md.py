"""report.md (what a person reads first) and the ROC figures (one per class set, like the paper's
Figure 5)."""
from __future__ import annotations

import os

import numpy as np

from unmask_jax.eval import report

_NAMES = {'None': 'None', 'AT': 'AT', 'unmask': 'UM'}


def _short(name: str) -> str:
  return _NAMES.get(name, name)


def roc_plots(results: dict, workdir: str) -> dict[str, str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from sklearn.metrics import roc_curve

  paths = {}
  for cs_name, cs in results['class_sets'].items():
    defenses = [d for d in results['defenses']
                if any(d in a['roc'] for a in cs['attacks'].values())]
    if not defenses:
      continue
    fig, axes = plt.subplots(1, len(defenses), figsize=(4.6 * len(defenses), 4.4), squeeze=False)
    for ax, d in zip(axes[0], defenses):
      for label, a in cs['attacks'].items():
        if d not in a['roc']:
          continue
        neg, pos = np.asarray(a['roc'][d]['neg']), np.asarray(a['roc'][d]['pos'])
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
        ax.plot(fpr, tpr, label=f'{label} ({a["detection"][d]["auc"]:.3f})')
      ax.plot([0, 1], [0, 1], 'k:', lw=0.8)
      ax.set(xlabel='false positive rate', ylabel='true positive rate',
             title=f'{cs_name.upper()} ({cs["overlap"]:.1%} overlap): {d}')
      ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    path = os.path.join(workdir, f'roc_{cs_name}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths[cs_name] = path
  return paths


def accuracy_rows(results: dict) -> tuple[list[dict], list[str]]:
  """Table IV form: one row per attack vector (+ clean and mean), columns class set x defense."""
  cols, rows = ['attack'], []
  methods = {}
  for cs_name, cs in results['class_sets'].items():
    ms = ['None'] + (['AT'] if 'AT' in cs['clean'] else []) + \
         [d for d in results['defenses'] if d in cs['clean']]
    methods[cs_name] = ms
    cols += [f'{cs_name.upper()} {_short(m)}' for m in ms]
  labels = []
  for cs in results['class_sets'].values():
    labels += [l for l in cs['attacks'] if l not in labels]
  sums: dict[str, list] = {}
  for label in labels:
    row = {'attack': label}
    for cs_name, cs in results['class_sets'].items():
      a = cs['attacks'].get(label)
      for m in methods[cs_name]:
        if a and m in a['accuracy']:
          v = a['accuracy'][m]
          row[f'{cs_name.upper()} {_short(m)}'] = v
          if not label.startswith('FGSM'):
            sums.setdefault(f'{cs_name.upper()} {_short(m)}', []).append(v)
    rows.append(row)
  rows.append({'attack': 'mean (paper vectors)', **{k: float(np.mean(v)) for k, v in sums.items()}})
  clean = {'attack': 'clean'}
  for cs_name, cs in results['class_sets'].items():
    for m in methods[cs_name]:
      clean[f'{cs_name.upper()} {_short(m)}'] = cs['clean'][m]
  rows.append(clean)
  return rows, cols


def detection_rows(results: dict) -> tuple[list[dict], list[str]]:
  rows = []
  for cs_name, cs in results['class_sets'].items():
    for label, a in cs['attacks'].items():
      for d, r in a['detection'].items():
        rows.append({'class set': cs_name.upper(), 'attack': label, 'detector': d, 'AUC': r['auc'],
                     'TPR@5%FPR': r['tpr@5%fpr'], 'test FPR (5%)': r['test_fpr@5%'],
                     'TPR@1%FPR': r['tpr@1%fpr'], 'test FPR (1%)': r['test_fpr@1%'],
                     'n pos/neg': f'{r["n_pos"]}/{r["n_neg"]}'})
  return rows, ['class set', 'attack', 'detector', 'AUC', 'TPR@5%FPR', 'test FPR (5%)', 'TPR@1%FPR',
                'test FPR (1%)', 'n pos/neg']


def k_rows(results: dict) -> list[dict]:
  rows = []
  for cs_name, cs in results['class_sets'].items():
    for label, a in cs['attacks'].items():
      if 'k_presence_f1_adv' not in a:
        continue
      m_clean = cs['clean']['None']
      rows.append({'class set': cs_name.upper(), 'attack': label,
                   'K F1 clean': a['k_presence_f1_clean'], 'K F1 adv': a['k_presence_f1_adv'],
                   'K drop': a['k_presence_f1_clean'] - a['k_presence_f1_adv'],
                   'M acc clean': m_clean, 'M acc adv': a['accuracy']['None'],
                   'M drop': m_clean - a['accuracy']['None']})
  return rows


def findings(results: dict) -> list[str]:
  """The paper's three claims, measured here (stated whether or not they reproduce)."""
  out = []
  acc, _ = accuracy_rows(results)
  mean = next(r for r in acc if r['attack'].startswith('mean'))
  for cs_name in results['class_sets']:
    c = cs_name.upper()
    none, at, um = mean.get(f'{c} None'), mean.get(f'{c} AT'), mean.get(f'{c} UM')
    if um is not None and at is not None:
      verdict = 'reproduces' if um > at > none else 'does NOT reproduce'
      out.append(f'{c}: mean accuracy under the paper vectors UM {um:.3f}, AT {at:.3f}, None {none:.3f} '
                 f'-> "UM > AT > None" {verdict}.')
  aucs = {}
  for cs_name, cs in results['class_sets'].items():
    v = [a['detection']['unmask']['auc'] for l, a in cs['attacks'].items()
         if 'unmask' in a['detection'] and not l.startswith('FGSM')]
    if v:
      aucs[cs_name] = float(np.mean(v))
  if 'cs3a' in aucs and 'cs3b' in aucs:
    verdict = 'reproduces' if aucs['cs3a'] > aucs['cs3b'] else 'does NOT reproduce'
    out.append(f'UnMask mean detection AUC: CS3a (6.9% overlap) {aucs["cs3a"]:.3f} vs CS3b (50% overlap) '
               f'{aucs["cs3b"]:.3f} -> "lower overlap detects better" {verdict}.')
  ks = k_rows(results)
  if ks:
    kd, md = np.mean([r['K drop'] for r in ks]), np.mean([r['M drop'] for r in ks])
    verdict = 'reproduces' if kd < md else 'does NOT reproduce'
    out.append(f'Under attack, K\'s part-presence F1 drops by {kd:.3f} on average while M\'s accuracy drops '
               f'by {md:.3f} -> "K degrades far less than M" {verdict}.')
  return out


def write_report(results: dict, plots: dict, workdir: str) -> str:
  acc, acc_cols = accuracy_rows(results)
  det, det_cols = detection_rows(results)
  lines = ['# unmask-jax evaluation report', '',
           f'Threat model: {results["threat_model"]}. Detection thresholds are set on held-out clean '
           'validation images; detectors are fitted on clean training images; positives are successful '
           'adversarial examples and negatives their clean counterparts.', '',
           '## Findings', ''] + [f'- {f}' for f in findings(results)] + [
           '', '## Accuracy (Table IV form; contamination 1 = every test image attacked)', '',
           'None = undefended M on attacks against M; AT = adversarially trained M on attacks against '
           'itself; other columns = defenses protecting M on the attacks against M.', '',
           report.table(acc, acc_cols, markdown=True), '',
           '## Detection (contamination 0.5)', '',
           report.table(det, det_cols, markdown=True) if det else
           '_No attack succeeded on at least 2 correctly classified images: nothing to detect._', '']
  for cs_name, path in plots.items():
    lines += [f'![ROC {cs_name}]({os.path.basename(path)})', '']
  ks = k_rows(results)
  if ks:
    lines += ['## Part extraction K under attack (why UnMask works, gray-box)', '',
              report.table(ks, list(ks[0]), markdown=True), '']
  k = results['k']
  lines += [f'K extraction thresholds (chosen on validation): min_area {k["min_area"]:g}, '
            f'min_conf {k["min_conf"]:g} (validation presence F1 {k["f1"]:.3f}).', '',
            '## Sanity checks of the attacks', '']
  for cs_name, cs in results['class_sets'].items():
    for key, who in (('sanity', 'M'), ('sanity_at', 'AT-M')):
      for c in cs.get(key, []):
        lines.append(f'- {cs_name.upper()} {who}: [{"ok" if c["ok"] else "**WARNING**"}] {c["check"]}: {c["detail"]}')
  lines += ['', f'Evaluation took {results["seconds"]}s. Every number is in results.json.', '']
  path = os.path.join(workdir, 'report.md')
  with open(path + '.tmp', 'w') as f:
    f.write('\n'.join(lines))
  os.replace(path + '.tmp', path)
  return path
