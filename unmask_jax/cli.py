"""The scripts' entry point: absl's `app.run` with one-line errors for mistakes a user can fix.

  from unmask_jax import cli
  _CONFIG = cli.define_config('config', 'configs/attack.py', 'Path to an attack config.')
  ...
  if __name__ == '__main__':
    cli.run(main)

Anticipated errors (a bad flag or `--config.<field>`, `errors.UserError` and its subclasses, the
registries' "Unknown <kind>" KeyError, ValueError from input and config checks, a missing input
file) print `error: <message>` on one line to stderr and exit with status 2, with no traceback:
the message already says what is wrong and how to fix it, and a traceback would bury it. Every
other exception is a bug and keeps its traceback. UNMASK_TRACEBACK=1 shows the traceback of the
one-line errors too (for debugging a message that is not clear enough).

Both cores by default on a CPU: before the script's main runs (and before jax starts its backend,
which reads XLA_FLAGS once), `run` adds `--xla_force_host_platform_device_count=<n>` to XLA_FLAGS,
n = the cores this process may use (rounded down to a power of two, at most 16, so that every
shipped batch size divides by it), unless XLA_FLAGS sets the count already or an accelerator is
meant to be used (JAX_PLATFORMS names another platform first, or, with JAX_PLATFORMS unset, a jax
GPU/TPU plugin is installed). Attacks, evaluation and training then shard their batches over the
n host devices (`unmask_jax.parallel`), with the results of one device (up to float32 rounding).
`--host_devices=<n>` (or the UNMASK_HOST_DEVICES environment variable) sets n; 1 restores one device.

Compiled programs are kept between runs: `run` points JAX's persistent compilation cache at
`$XDG_CACHE_HOME/unmask_jax/xla` (default `~/.cache/unmask_jax/xla`) for programs that took at
least MIN_CACHED_COMPILE_S to compile, so that a script run again (the main job after a change,
an evaluation with other flags) loads them instead of compiling them again: XLA:CPU compilation is
a large share of the main job (see the README). `--compilation_cache=<dir>` (or the
UNMASK_COMPILATION_CACHE environment variable) picks the directory, `off` turns it off; a
JAX_COMPILATION_CACHE_DIR you set is used as it is. A loaded program is the same executable, so
results do not change. The cache is trusted code: keep it in a directory only you can write.
"""
from __future__ import annotations

import difflib
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from unmask_jax import errors

EXIT_USER_ERROR = 2

HOST_DEVICES_ENV = 'UNMASK_HOST_DEVICES'
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
MAX_DEFAULT_HOST_DEVICES = 16   # the smallest batch size of the shipped configs
COMPILATION_CACHE_ENV = 'UNMASK_COMPILATION_CACHE'
# Programs compiling faster than this are not written to the cache: in the main job (2-core CPU,
# 2026-12-03) 52 of its 405 compilations took >= 0.5 s and held 141 of its 168 s of XLA compile
# time; the other ~350 would cost a file each for 27 s in all.
MIN_CACHED_COMPILE_S = 0.5
_OFF = ('off', 'none', 'no', 'false', '0')
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    'Directory of JAX\'s persistent compilation cache, which keeps compiled programs between runs '
    '(a second run of a script loads them instead of compiling again; same results). Default: '
    '$XDG_CACHE_HOME/unmask_jax/xla, i.e. ~/.cache/unmask_jax/xla; "off" turns it off. Also '
    f'settable as the {COMPILATION_CACHE_ENV} environment variable; a JAX_COMPILATION_CACHE_DIR '
    'you set is used as it is.')
_HOST_DEVICES = flags.DEFINE_integer(
    'host_devices', None,
    'CPU only: number of XLA host devices the batches are sharded over (data parallel, one per '
    'core; the results equal those of one device up to float rounding). Default: the usable '
    f'cores, rounded down to a power of two, at most {MAX_DEFAULT_HOST_DEVICES}; 1 = one device. '
    f'Also settable as the {HOST_DEVICES_ENV} environment variable. A count set in XLA_FLAGS '
    f'({DEVICE_COUNT_FLAG}=<n>) is used as it is (giving this too is an error); by default nothing '
    'is changed when JAX_PLATFORMS names another platform first or a jax GPU/TPU plugin is '
    'installed.', lower_bound=1)


def one_line(message: str) -> str:
  """Joins a (possibly multi-line) message into one line."""
  return ' '.join(part.strip() for part in str(message).splitlines() if part.strip())


def user_message(e: BaseException) -> str | None:
  """The one-line message for an anticipated error, or None for a bug (keep the traceback)."""
  if isinstance(e, errors.UserError):
    return one_line(str(e))
  if isinstance(e, KeyError) and e.args and str(e.args[0]).startswith('Unknown '):
    return one_line(e.args[0])          # registry typo: the message lists the valid names
  if isinstance(e, FileNotFoundError):
    if e.filename and e.strerror:
      return one_line(f'{e.strerror}: {e.filename}')
    return one_line(str(e))
  if isinstance(e, ValueError):
    return one_line(str(e))
  if isinstance(e, flags.Error):
    return one_line(str(e))
  return None


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def _unknown_override(argv: list[str]) -> str | None:
  """Names the first `--<config flag>.<path>=...` whose path is not a field of the loaded config.

  ml_collections reports an unknown field as a bare AttributeError("'foo'"); this finds the
  flag, the field and the nearest valid names instead.
  """
  for arg in argv[1:]:
    if not arg.startswith('--') or '.' not in arg.split('=', 1)[0]:
      continue
    name, *path = arg[2:].split('=', 1)[0].split('.')
    if name not in _CONFIG_DEFAULTS:
      continue
    node = _load_config(name, argv)
    if node is None:
      continue
    for i, field in enumerate(path):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if field not in keys:
        where = '.'.join([name] + path[:i]) or name
        close = difflib.get_close_matches(field, keys, n=1)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        return (f'unknown config field {field!r} in {arg.split("=", 1)[0]}; {hint}'
                f'the fields of --{where} are: {", ".join(sorted(keys))}')
      node = node[field]
  return None


def _load_config(name: str, argv: list[str]):
  """The config file of flag `--<name>` as given in argv (or its default), None if unavailable."""
  path = _CONFIG_DEFAULTS.get(name)
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f'--{name}='):
      path = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      path = argv[i + 1]
  if not path:
    return None
  try:
    from ml_collections.config_flags import config_flags as impl  # the parser is not re-exported
    return impl.ConfigFileFlagParser(name=name).parse(path)
  except Exception:  # pylint: disable=broad-except
    return None  # the caller's generic message is shown instead


def _override_error(e: Exception, argv: list[str]) -> str:
  msg = _unknown_override(argv)
  if msg is None:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = (f'bad config flag ({type(e).__name__}: {one_line(text)}); see the config file for the '
           'fields and their types')
  return msg


_CONFIG_DEFAULTS: dict[str, str | None] = {}


def define_config(name: str, default: str | None, help_string: str):
  """`config_flags.DEFINE_config_file` (locked config) with a one-line error for a bad override.

  With a default file, ml_collections applies `--<name>.<field>` overrides while the flag is
  defined, i.e. at import, before `run` can catch anything; this catches that case too.
  """
  _CONFIG_DEFAULTS[name] = default
  given = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith(f'--{name}=')), None)
  if given or default:
    help_string = help_string + config_help(name, given or default)
  else:
    help_string += f' (Give --{name}=<file> with --help to list its fields and defaults.)'
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    # Listed by --help of the calling script (not only --helpfull): a key flag of its module.
    caller = sys._getframe(1).f_globals.get('__name__', '__main__')  # pylint: disable=protected-access
    if caller == '__main__':
      caller = sys.argv[0]   # absl's name for the script's module
    flags.FLAGS.register_key_flag_for_module(caller, flags.FLAGS[name])
    return holder
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    _fail(_override_error(e, sys.argv))


def _comments(path: str) -> dict[str, str]:
  """field name -> the trailing `# comment` of the line that sets it, over the config file and
  the other files of its folder (configs import each other's get_config)."""
  import re
  out: dict[str, str] = {}
  folder = os.path.dirname(os.path.abspath(path))
  try:
    src = open(path).read()
  except OSError:
    return out
  # The file itself first, then the config modules it imports (`from configs import a, b`).
  imported = [os.path.join(folder, f'{m.strip()}.py') for line in re.findall(r'from configs import ([\w, ]+)', src)
              for m in line.split(',')]
  for f in [os.path.abspath(path)] + imported + [os.path.join(folder, 'common.py')]:
    try:
      lines = open(f).read().splitlines()
    except OSError:
      continue
    for line in lines:
      m = re.search(r"""(?:\.(\w+)\s*=|'(\w+)'\s*:)[^#]*#\s*(.+)$""", line)
      if m:
        out.setdefault(m.group(1) or m.group(2), m.group(3).strip())
  return out


def config_help(name: str, path: str) -> str:
  """The fields of a config file, their defaults and their one-line comments, for --help."""
  try:
    from ml_collections.config_flags import config_flags as impl
    config = impl.ConfigFileFlagParser(name=name).parse(path.split(':')[0] if path.endswith(
        (':tiny', ':full')) else path)
  except Exception:  # pylint: disable=broad-except
    return ''
  notes = _comments(path.split(':')[0])
  rows = []

  def walk(node, prefix):
    for k in sorted(node.keys()):
      v = node[k]
      if hasattr(v, 'keys') and len(v):
        walk(v, f'{prefix}{k}.')
        continue
      note = notes.get(k, '')
      text = repr(v if not hasattr(v, 'to_dict') else v.to_dict())
      rows.append(f'    --{name}.{prefix}{k}={text[:60]}' + (f'  # {note}' if note else ''))
  walk(config, '')
  return (f'\n  Fields of {path} (override any with --{name}.<field>=<value>; '
          'the file says more):\n' + '\n'.join(rows))


def _check_config_files() -> None:
  """ml_collections defers a config file's load error to the first use; surface it now."""
  for name in _CONFIG_DEFAULTS:
    if name not in flags.FLAGS:
      continue
    try:
      value = flags.FLAGS[name].value
      if value is not None:
        value.keys()
    except (OSError, ImportError, SyntaxError, AttributeError) as e:
      _fail(f'cannot load the config file of --{name}: {one_line(str(e))}')


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))   # what this process may run on (taskset, cgroups' cpusets)
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _accelerator_plugin_installed() -> bool:
  """Whether a jax GPU/TPU plugin is installed (looked up without importing it)."""
  import importlib.metadata
  import importlib.util
  try:
    if list(importlib.metadata.entry_points(group='jax_plugins')):
      return True
    spec = importlib.util.find_spec('jax_plugins')
    if spec is not None and spec.submodule_search_locations:
      import pkgutil
      if any(True for _ in pkgutil.iter_modules(spec.submodule_search_locations)):
        return True
    return importlib.util.find_spec('libtpu') is not None
  except Exception:  # pylint: disable=broad-except
    return False


def host_device_count(requested: int | None, environ=None, cores: int | None = None) -> int | None:
  """The host device count to force in XLA_FLAGS, or None to leave XLA_FLAGS alone.

  `requested` is --host_devices (None: not given); then UNMASK_HOST_DEVICES; then the default
  (the module docstring says which). A count already in XLA_FLAGS always wins.
  """
  environ = os.environ if environ is None else environ
  if requested is None and environ.get(HOST_DEVICES_ENV, '').strip():
    text = environ[HOST_DEVICES_ENV].strip()
    if not text.isdigit() or int(text) < 1:
      raise errors.ConfigError(f'{HOST_DEVICES_ENV}={text!r} must be a whole number >= 1 '
                               '(1 = one device)')
    requested = int(text)
  if DEVICE_COUNT_FLAG in environ.get('XLA_FLAGS', ''):
    if requested is not None:
      raise errors.ConfigError(f'the host device count is given twice: {requested} by --host_devices '
                               f'or {HOST_DEVICES_ENV}, and in XLA_FLAGS ({environ["XLA_FLAGS"]}); '
                               'give it once')
    return None
  if requested is not None:
    return requested if requested > 1 else None
  platforms = (environ.get('JAX_PLATFORMS') or environ.get('JAX_PLATFORM_NAME') or '').strip().lower()
  if platforms and platforms.split(',')[0].strip() != 'cpu':
    return None      # an accelerator (or something else) is asked for: leave it be
  if not platforms and _accelerator_plugin_installed():
    return None      # a GPU/TPU may be used: its devices, not the host's, are the ones to shard over
  cores = usable_cores() if cores is None else cores
  n = 1
  while n * 2 <= min(cores, MAX_DEFAULT_HOST_DEVICES):
    n *= 2
  return n if n > 1 else None


def use_host_devices(requested: int | None = None) -> int | None:
  """Adds the host device count (`host_device_count`) to XLA_FLAGS; returns it, None if unchanged.

  Must run before jax's backend starts (the scripts call it from `run`, before main).
  """
  n = host_device_count(requested)
  if n is None:
    return None
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {DEVICE_COUNT_FLAG}={n}'.strip()
  backends = getattr(sys.modules.get('jax._src.xla_bridge'), '_backends', None)
  if backends and requested is not None:
    print(f'warning: jax started before --host_devices={requested} could apply; it has no effect',
          file=sys.stderr)
  return n


def compilation_cache_dir(requested: str | None = None,
                          environ: dict | None = None) -> str | None:
  """Where `run` puts JAX's persistent compilation cache; None leaves JAX's setting alone.

  `requested` is --compilation_cache (None: not given); then UNMASK_COMPILATION_CACHE; then
  $XDG_CACHE_HOME/unmask_jax/xla (~/.cache/unmask_jax/xla). "off" (or none/no/false/0, or an empty
  value) turns the cache off; a JAX_COMPILATION_CACHE_DIR in the environment is the user's own
  choice, which JAX reads itself.
  """
  environ = os.environ if environ is None else environ
  if environ.get('JAX_COMPILATION_CACHE_DIR'):
    if requested is not None:
      raise errors.ConfigError(
          f'the compilation cache is given twice: --compilation_cache={requested} and '
          f'JAX_COMPILATION_CACHE_DIR={environ["JAX_COMPILATION_CACHE_DIR"]}; give it once')
    return None
  value = requested if requested is not None else environ.get(COMPILATION_CACHE_ENV)
  if value is not None:
    value = value.strip()
    return None if value.lower() in _OFF or not value else os.path.expanduser(value)
  root = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'unmask_jax', 'xla')


def use_compilation_cache(requested: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache in `compilation_cache_dir(requested)` for
  programs that compile in at least MIN_CACHED_COMPILE_S; returns the directory (None: unchanged).
  Must run before the first compilation (the scripts call it from `run`, before main)."""
  path = compilation_cache_dir(requested)
  if path is None:
    return None
  import jax  # pylint: disable=import-outside-toplevel  (after XLA_FLAGS is final)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_CACHED_COMPILE_S)
  return path


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{one_line(str(e))} (see --help)')
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # ml_collections raises these for a bad `--config.<field>` override or config file.
    _fail(_override_error(e, argv))
  _check_config_files()
  try:
    use_host_devices(_HOST_DEVICES.value)
    use_compilation_cache(_COMPILATION_CACHE.value)
  except errors.UserError as e:
    _fail(one_line(str(e)))
  return args


def guarded(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """Wraps a script's main so that anticipated errors become one line and exit status 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      message = user_message(e)
      if message is None or os.environ.get('UNMASK_TRACEBACK'):
        raise
      _fail(message)
  return wrapped


def run(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` with one-line errors for bad flags and anticipated failures, the batches
  sharded over one host device per core on a CPU, and compiled programs kept between runs (see
  the module docstring)."""
  # Listed by the script's --help (a key flag of its module), like --config.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS['host_devices'])
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS['compilation_cache'])
  app.run(guarded(main), flags_parser=_parse_flags)
