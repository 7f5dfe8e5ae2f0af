"""report.md (what a person reads first) and the ROC figures (one per class set, like the paper's
Figure 5)."""
from __future__ import annotations

import os

import numpy as np

from unmask_jax.eval import report
from unmask_jax.train import checkpoint as ckpt

_NAMES = {'None': 'None', 'AT': 'AT', 'unmask': 'UM'}
_METRICS = {'mutual_information': 'MI', 'entropy': 'H', 'variance': 'Var', 'confidence': 'Conf'}


def _short(name: str) -> str:
  """A column-sized name: UM, MC-MI, LR, mrr(n=4, sp=5), DP(fixed) ..."""
  if name in _NAMES:
    return _NAMES[name]
  if name.startswith('mc_dropout'):
    metric = next((v for k, v in _METRICS.items() if k in name), 'H')
    return f'MC-{metric}'
  if name.startswith('lr_combiner'):
    return 'LR' if name == 'lr_combiner' else 'LR*'   # LR* = non-default members
  if name == 'deep_protection':
    return 'DP (subset)'
  if name.startswith('deep_protection'):
    return name.replace('deep_protection', 'DP')
  return name


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
    # One colour per attack in every panel (and every class set), in the order attacks were run.
    labels = list(dict.fromkeys(l for c in results['class_sets'].values() for l in c['attacks']))
    palette = plt.get_cmap('tab10' if len(labels) <= 10 else 'tab20')
    colour = {l: palette(i % palette.N) for i, l in enumerate(labels)}
    ncols = min(4, len(defenses))
    nrows = -(-len(defenses) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(defenses):]:
      ax.axis('off')
    for ax, d in zip(axes.ravel(), defenses):
      for label, a in cs['attacks'].items():
        if d not in a['roc']:
          continue
        neg, pos = np.asarray(a['roc'][d]['neg']), np.asarray(a['roc'][d]['pos'])
        fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
        ax.plot(fpr, tpr, color=colour[label], label=f'{label} ({a["detection"][d]["auc"]:.3f})')
      # Log-scaled FPR: the operating region of a detector (1-5% FPR) is where curves differ.
      chance = np.logspace(-3, 0, 50)
      ax.plot(chance, chance, 'k:', lw=0.8)
      ax.set_xscale('log')
      ax.set_xlim(1e-3, 1.0)
      ax.axvline(0.05, color='0.7', lw=0.8, ls='--')
      ax.set(xlabel='false positive rate (log scale; dashed: 5%)', ylabel='true positive rate',
             title=f'{cs_name.upper()} ({cs["overlap"]:.1%} overlap): {_short(d)}')
      ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    path = os.path.join(workdir, f'roc_{cs_name}.png')
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths[cs_name] = path
  return paths


def _with_ci(v: float, ci) -> str | float:
  """'0.985 [0.970, 0.995]': a value with its bootstrap 95% CI (the value alone without one)."""
  if not ci or any(c != c for c in ci):
    return v
  return f'{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]'


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
          row[f'{cs_name.upper()} {_short(m)}'] = _with_ci(v, a.get('accuracy_ci', {}).get(m))
          if not label.startswith('FGSM'):
            sums.setdefault(f'{cs_name.upper()} {_short(m)}', []).append(v)
    rows.append(row)
  rows.append({'attack': 'mean (paper vectors)', **{k: float(np.mean(v)) for k, v in sums.items()}})
  worst = {'attack': 'worst case (per image, every attack above)'}
  for cs_name, cs in results['class_sets'].items():
    for m, v in cs.get('worst_case', {}).get('accuracy', {}).items():
      if m in methods[cs_name]:
        worst[f'{cs_name.upper()} {_short(m)}'] = _with_ci(v, cs['worst_case']['accuracy_ci'].get(m))
  if len(worst) > 1:
    rows.append(worst)
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
        rows.append({'class set': cs_name.upper(), 'attack': label, 'detector': _short(d), 'AUC': r['auc'],
                     'TPR@5%FPR': r['tpr@5%fpr'], 'test FPR (5%)': r['test_fpr@5%'],
                     'TPR@1%FPR': r['tpr@1%fpr'], 'test FPR (1%)': r['test_fpr@1%'],
                     'n pos/neg': f'{r["n_pos"]}/{r["n_neg"]}'})
  return rows, ['class set', 'attack', 'detector', 'AUC', 'TPR@5%FPR', 'test FPR (5%)', 'TPR@1%FPR',
                'test FPR (1%)', 'n pos/neg']


def auc_rows(results: dict) -> tuple[list[dict], list[str]]:
  """Detection AUC per (class set, attack) x detector: the compact view of the detection table."""
  dets = list(results['defenses'])
  rows = []
  for cs_name, cs in results['class_sets'].items():
    for label, a in cs['attacks'].items():
      row = {'class set': cs_name.upper(), 'attack': label, 'success': a['success_rate']}
      row.update({_short(d): _with_ci(a['detection'][d]['auc'], a['detection'][d].get('auc_ci'))
                  for d in dets if d in a['detection']})
      rows.append(row)
  return rows, ['class set', 'attack', 'success'] + [_short(d) for d in dets]


def flag_rows(results: dict) -> list[dict]:
  """Defenses with their own operating point (MRR's SP): flag rates and defense success.

  Means over the attacks that are not FGSM references; 'clean flagged' is the false-positive cost
  on clean test images at that operating point.
  """
  rows = []
  for cs_name, cs in results['class_sets'].items():
    paper = [a for l, a in cs['attacks'].items() if not l.startswith('FGSM')]
    for d, fc in cs.get('flags_clean', {}).items():
      per = [a['flags'][d] for a in paper if d in a.get('flags', {})]
      aucs = [a['detection'][d]['auc'] for a in paper if d in a['detection']]
      if not per:
        continue
      rows.append({'class set': cs_name.upper(), 'defense': d,
                   'clean flagged (val)': fc['validation'], 'clean flagged (test)': fc['test'],
                   'adv flagged': float(np.mean([p['adv_flag_rate'] for p in per])),
                   'defense success': float(np.mean([p['defense_success'] for p in per])),
                   'no defense': float(np.mean([1 - a['success_rate'] for a in paper])),
                   'mean AUC': float(np.mean(aucs)) if aucs else float('nan')})
  return rows


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
  out += _seed_findings(results)
  return out


def _seed_findings(results: dict) -> list[str]:
  """Rouhani et al. 2018 (MRR: more defenders -> more detection, more false positives) and Tuna et al. 2021 (the
  LR combination >= its best member) on SynthParts, measured."""
  out = []
  flags = {(r['class set'], r['defense']): r for r in flag_rows(results)}
  for cs_name in results['class_sets']:
    c = cs_name.upper()
    mrr = sorted(((int(d.split('n=')[1].split(')')[0].split(',')[0]), d) for (cc, d) in flags
                  if cc == c and d.startswith('mrr(') and 'sp=' not in d))
    if len(mrr) >= 2:
      lo, hi = flags[(c, mrr[0][1])], flags[(c, mrr[-1][1])]
      rises = hi['defense success'] > lo['defense success']
      out.append(f'{c} MRR (SP 1%): N={mrr[0][0]} -> N={mrr[-1][0]} defenders: defense success '
                 f'{lo["defense success"]:.3f} -> {hi["defense success"]:.3f}, clean test flagged '
                 f'{lo["clean flagged (test)"]:.3f} -> {hi["clean flagged (test)"]:.3f} -> "defense '
                 f'success rises with N, at a false-positive cost" '
                 f'{"reproduces" if rises else "does NOT reproduce"}.')
    cs = results['class_sets'][cs_name]
    combs = [d for d in results['defenses'] if d.startswith('lr_combiner')]
    if combs:
      from unmask_jax.defenses import combiner
      from unmask_jax.registry import parse_spec
      members = parse_spec(combs[0])[1].get('members', combiner.DEFAULT_MEMBERS)
      member_names = {parse_spec(m)[0] for m in members}
      singles = [d for d in results['defenses'] if parse_spec(d)[0] in member_names]
      wins = total = 0
      for a in cs['attacks'].values():
        if combs[0] in a['detection'] and any(d in a['detection'] for d in singles):
          best = max(a['detection'][d]['auc'] for d in singles if d in a['detection'])
          total += 1
          wins += a['detection'][combs[0]]['auc'] >= best - 0.01
      if total:
        out.append(f'{c} LR combiner: AUC within 0.01 of or above the best single member shown '
                   f'here ({", ".join(_short(d) for d in singles)}) on {wins}/{total} attacks -> '
                   f'"the combination is at least as good as the best single metric" '
                   f'{"reproduces" if wins == total else "does NOT reproduce everywhere"}.')
  return out


ADAPTIVE_THREAT = ('white-box, defense-aware: the attacker knows M, the defense, its fitted state '
                   'and threshold (attacks.adaptive)')
WORST_THREAT = 'per-image worst case over the gray-box attack and the adaptive (white-box) attack'


def adaptive_rows(results: dict) -> list[dict]:
  """One row per (class set, defense, paired attack) of the adaptive evaluation."""
  rows = []
  for cs_name, cs in results['class_sets'].items():
    for d, per in cs.get('adaptive', {}).items():
      for label, r in per.items():
        row = {'class set': cs_name.upper(), 'defense': _short(d), 'attack': label,
               'images': r['n_images'], 'steps': r['steps'],
               'gray-box success': r['graybox_success'], 'adaptive success': r['adaptive_success'],
               'worst-case success': r['worst_case_success'],
               'gray-box AUC': r['graybox_auc'], 'adaptive AUC': r['auc'],
               'defended acc (worst case)': r.get('worst_case_defense_accuracy', float('nan')),
               'seconds': r['seconds']}
        rows.append(row)
  return rows


def headline_rows(results: dict) -> list[dict]:
  """Per (class set, defense): the worst-case attack success at each paired attack.

  attack success = M fooled AND not flagged AND (corrector) the defended class wrong; worst case =
  per image, the gray-box OR the adaptive attack succeeds.
  """
  rows = []
  for cs_name, cs in results['class_sets'].items():
    for d, per in cs.get('adaptive', {}).items():
      row = {'class set': cs_name.upper(), 'defense': _short(d)}
      for label, r in per.items():
        row[f'{label}: worst case (gray-box)'] = (f'**{r["worst_case_success"]:.3f}** '
                                                 f'({r["graybox_success"]:.3f})')
      rows.append(row)
  return rows


def adaptive_findings(results: dict) -> list[str]:
  """What the adaptive evaluation changes, per defense, stated whether it breaks the defense or not."""
  out = []
  for cs_name, cs in results['class_sets'].items():
    for d, per in cs.get('adaptive', {}).items():
      if not per:
        continue
      label, r = max(per.items(), key=lambda kv: kv[1]['worst_case_success'])
      line = (f'{cs_name.upper()} {_short(d)} under {label}: attack success {r["graybox_success"]:.3f} '
              f'gray-box -> {r["adaptive_success"]:.3f} adaptive, worst case {r["worst_case_success"]:.3f} '
              f'({r["n_images"]} images, {r["steps"]} steps x {r["restarts"]} restart(s), every wrong '
              'class a target)')
      if r['adaptive_success'] + 1e-9 < r['graybox_success']:
        line += ('; the adaptive attack is WEAKER than the gray-box one here: a weakness of its '
                 'surrogate or budget, not evidence of robustness')
      elif r['worst_case_success'] < 0.5:
        line += ('; not broken at this budget: an upper bound on robustness only (a stronger or '
                 'better-aimed attack may do better)')
      out.append(line + '.')
  return out


def write_report(results: dict, plots: dict, workdir: str, extra_sections=()) -> str:
  acc, acc_cols = accuracy_rows(results)
  det, det_cols = detection_rows(results)
  lines = ['# unmask-jax evaluation report', '',
           'Two threat models. Headline: the per-image worst case over gray-box and adaptive '
           f'attacks (next section). Every other table: {results["threat_model"]}; those numbers are '
           'upper bounds on what a defense-aware attacker leaves. Detection thresholds are set on '
           'held-out clean validation images; detectors are fitted on clean training images; '
           'positives are successful adversarial examples and negatives their clean counterparts.', '',
           '## Findings', ''] + [f'- {f}' for f in findings(results)] + _adaptive_section(results) + [
           '', '## Accuracy (gray-box; Table IV form; contamination 1 = every test image attacked)', '',
           'None = undefended M on attacks against M; AT = adversarially trained M on attacks against '
           'itself; other columns = defenses protecting M on the attacks against M. "DP (subset)" = '
           'Deep Protection with its validation-chosen fixed stop, on the first test images only '
           '(see its section; its mean is over the attacks it was run on). In brackets: bootstrap '
           '95% confidence intervals over the test images. The worst-case row counts an image as '
           'correct only if it is correct under every attack (per image, as AutoAttack does).', '',
           report.table(acc, acc_cols, markdown=True), '',
           '## Detection (gray-box; contamination 0.5): ROC AUC', '',
           'UM = UnMask, MC-* = MC-dropout metric, LR = logistic-regression combiner (fitted per attack '
           'on attacks of held-out validation images, never on the scored images), mrr(n, sp) = MRR '
           'with n defenders.', '']
  aucs, auc_cols = auc_rows(results)
  lines += [report.table(aucs, auc_cols, markdown=True) if det else
            '_No attack succeeded on at least 2 correctly classified images: nothing to detect._', '']
  for cs_name, path in plots.items():
    lines += [f'![ROC {cs_name}]({os.path.basename(path)})', '']
  fl = flag_rows(results)
  if fl:
    lines += ['## MRR at its security parameter (Rouhani et al. 2018)', '',
              'Each defender flags an input when its distance to the victim-predicted class centre '
              'exceeds the (100 - SP) percentile of clean training distances; N defenders flag if any '
              'flags. Means over the paper vectors. Defense success = share of correctly classified '
              'images on which the attack fails or is flagged; "no defense" = share on which it fails.', '',
              report.table(fl, list(fl[0]), markdown=True), '']
    for cs_name, cs in results['class_sets'].items():
      for d in cs.get('mrr_defenders', []):
        lines.append(f'- {cs_name.upper()} defender {d["dir"]}: clean test accuracy of its own head '
                     f'{d["test_accuracy"]:.3f}')
    lines.append('')
  for cs_name, cs in results['class_sets'].items():
    if 'dip' in cs:
      from unmask_jax.eval import deep_protection_eval
      lines += [deep_protection_eval.report_section(cs['dip']).replace(
          '## Deep Protection', f'## {cs_name.upper()}: Deep Protection', 1), '']
  cost_rows = [{'class set': c.upper(), **{_short(d): v for d, v in cs['defense_seconds'].items()}}
               for c, cs in results['class_sets'].items() if cs.get('defense_seconds')]
  if cost_rows:
    lines += ['## Cost of each defense (wall seconds in this evaluation: fit unless cached, then '
              'scoring every validation, test and attacked image)', '',
              report.table(cost_rows, list(cost_rows[0]), markdown=True), '']
  lines += ['## Detection details: TPR at thresholds set on clean validation', '',
            report.table(det, det_cols, markdown=True) if det else '', '']
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
  for extra in extra_sections:
    with open(extra) as f:
      lines += [f.read().rstrip(), '']
  path = os.path.join(workdir, 'report.md')
  ckpt.write_text_atomic(path, '\n'.join(lines))
  return path


def _adaptive_section(results: dict) -> list[str]:
  """The headline (worst case) and adaptive tables, with their threat models and sanity checks."""
  rows = adaptive_rows(results)
  if not rows:
    return ['', '_No adaptive evaluation in this run (evaluate config: adaptive.n_images = 0): every '
            'number below is gray-box only, an upper bound on robustness._']
  from unmask_jax.eval import adaptive_eval
  head = headline_rows(results)
  cols = list(dict.fromkeys(k for r in head for k in r))
  lines = ['', '## Headline: attack success, per-image worst case (gray-box + adaptive)', '',
           f'Threat model: {WORST_THREAT}. Attack success = M fooled AND the defense does not flag '
           '(threshold at 5% FPR on clean validation) AND, for correctors, the defended class is '
           "wrong; judged by the defense's exact decision on the 8-bit-rounded image. Lower is "
           'better for the defense. Images: the first test images (see "images" below).', '',
           report.table(head, cols, markdown=True), '']
  lines += ['### Adaptive attacks, per defense', '',
            f'Threat model: {ADAPTIVE_THREAT}. Each defense is attacked through its differentiable '
            'surrogate (BPDA + EOT where it is random or non-differentiable: Deep Protection with a '
            'small DIP iteration count, stated in its name) with every wrong class as a target, best '
            'per image; gray-box = the stored attack on M alone, judged by the same decision. AUC = '
            'detection ROC AUC of clean test images vs adversarial images that fool M (below 0.5: '
            'adversarial images look MORE typical than clean ones).', '',
            report.table(rows, list(rows[0]), markdown=True), '']
  lines += ['Findings of the adaptive evaluation:', ''] + [f'- {f}' for f in adaptive_findings(results)]
  checks = []
  for cs_name, cs in results['class_sets'].items():
    checks += [f'- {cs_name.upper()} {c}' for c in adaptive_eval.sanity_checks(cs.get('adaptive', {}))]
  lines += ['', 'Sanity checks of the adaptive attacks:', ''] + checks
  return lines
