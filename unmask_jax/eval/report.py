"""Plain-text and markdown tables for what the scripts print and write."""
from __future__ import annotations


def _fmt(v) -> str:
  if isinstance(v, float):
    return f'{v:.4f}' if abs(v) < 100 else f'{v:.1f}'
  return str(v)


def table(rows: list[dict], columns: list[str], *, markdown: bool = False) -> str:
  """Formats rows (dicts) as an aligned text table, or a GitHub-markdown table."""
  cells = [[_fmt(r.get(c, '')) for c in columns] for r in rows]
  if markdown:
    out = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
    out += ['| ' + ' | '.join(row) + ' |' for row in cells]
    return '\n'.join(out)
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda vals: '  '.join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
  return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells])
