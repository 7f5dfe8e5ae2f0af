"""Studies that reproduce a paper's table: a config plus a thin script on top of `unmask_jax`.

Run from the repository root, e.g. `python3 -m experiments.digits.study --workdir=runs/digits`.
The library never imports this package (tests/test_imports.py checks it).
"""
